//! The durable store's engine on PostgreSQL: the same records and the same group commit
//! as on redb (one transaction per batch of waiting writers, its statements pipelined on
//! one connection), so every store feature keeps its semantics. The store's calls are
//! synchronous (they come from the commit thread and from blocking sections): one thread
//! owns the connection and a small runtime, and runs each call to its end in turn.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio_postgres::types::ToSql;

use crate::store::StoreError;
use crate::store::durable::Op;
use crate::store::durable::engine::{Deliveries, Engine, Loaded};

type Call = Box<dyn FnOnce(&mut Connection) + Send>;

/// A statement's parameters, owned (they cross to the connection thread).
pub(super) type Params = Vec<Box<dyn ToSql + Send + Sync>>;

/// The connection thread's side: the client, reconnected when it dropped.
pub struct Connection {
    runtime: tokio::runtime::Runtime,
    database: super::Database,
    client: Option<tokio_postgres::Client>,
    /// Holds the store-wide lock that says one operator owns this database (taken again
    /// on every new connection: a reconnect must not let a second owner in).
    exclusive: bool,
    /// How long the next connection waits for the lock (see `PREDECESSOR_GRACE`).
    patience: std::time::Duration,
    /// A commit whose outcome is not known yet (see `settle`).
    unsure: Option<Unsure>,
    /// Leaves of commits reported failed that did land (see `Landed`).
    landed: Landed,
    /// The sole owner's view of the log's head (size, packed frontier) after its last
    /// commit: no other process appends to the log while it holds the store-wide lock, so
    /// its appends need not lock and read the head first (see `append_audit`). Forgotten
    /// on any failure, and read again.
    head: Option<(u64, Vec<u8>)>,
    /// `APPEND_AT`, prepared on the current client.
    append_at: Option<tokio_postgres::Statement>,
}

impl Connection {
    /// The runtime and the connected client (connecting again if the last one dropped).
    fn parts(&mut self) -> Result<(&tokio::runtime::Runtime, &mut tokio_postgres::Client), StoreError> {
        self.client()?;
        match self.client.as_mut() {
            Some(client) => Ok((&self.runtime, client)),
            None => Err(StoreError::Unavailable("no PostgreSQL connection".into())),
        }
    }

    fn client(&mut self) -> Result<&mut tokio_postgres::Client, StoreError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let client = self.runtime.block_on(self.database.connect()).map_err(unavailable)?;
            if self.exclusive {
                self.runtime
                    .block_on(super::shared::hold_exclusive(&client, self.patience))
                    .map_err(|e| StoreError::Unavailable(crate::error_chain(&e)))?;
            }
            // Only the first connection waits out a predecessor's session; a reconnect
            // that finds the lock taken reports the store unavailable at once.
            self.patience = std::time::Duration::ZERO;
            self.client = Some(client);
            self.append_at = None;
            self.head = None;
        }
        self.client
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("no PostgreSQL connection".into()))
    }
}

pub(super) fn unavailable(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(format!("PostgreSQL: {}", crate::error_chain(&e)))
}

/// Keys are unsigned in the store and signed in PostgreSQL; every key the store makes
/// (counters, nanoseconds since 1970) fits.
pub(super) fn signed(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::Failed(format!("{n} does not fit a PostgreSQL bigint")))
}

/// The engine: a handle on the connection thread.
pub struct Postgres {
    calls: Mutex<SyncSender<Call>>,
    /// Fenced writes the database refused (their claim had moved on).
    pub(super) fenced: std::sync::atomic::AtomicU64,
    /// The database size and when it was read (or last asked for).
    size: Arc<Mutex<Option<(Instant, u64)>>>,
}

impl Postgres {
    /// Connects (the schema must be migrated: `migrations::migrate`). The runtime and the
    /// connection are made, used and dropped on the connection thread only, so this may be
    /// called from anywhere, async code included (it waits for the first connection).
    pub fn connect(database: super::Database) -> Result<Postgres, StoreError> {
        Postgres::start(database, false)
    }

    /// As `connect`, for the single operator of a database: refused while another operator
    /// (single, or replicas sharing it) uses the database.
    pub fn connect_exclusive(database: super::Database) -> Result<Postgres, StoreError> {
        Postgres::start(database, true)
    }

    fn start(database: super::Database, exclusive: bool) -> Result<Postgres, StoreError> {
        let (tx, rx) = sync_channel::<Call>(64);
        let (ready_tx, ready_rx) = sync_channel::<Result<(), StoreError>>(1);
        std::thread::Builder::new()
            .name("store-postgres".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(StoreError::io(e)));
                        return;
                    }
                };
                let mut connection = Connection {
                    runtime,
                    database,
                    client: None,
                    exclusive,
                    patience: super::shared::PREDECESSOR_GRACE,
                    unsure: None,
                    landed: Landed::default(),
                    head: None,
                    append_at: None,
                };
                let first = connection.client().map(|_| ());
                let ok = first.is_ok();
                let _ = ready_tx.send(first);
                if ok {
                    serve(connection, rx);
                }
            })
            .map_err(StoreError::io)?;
        ready_rx
            .recv()
            .map_err(|_| StoreError::Unavailable("the PostgreSQL connection thread stopped".into()))??;
        let engine = Postgres {
            fenced: std::sync::atomic::AtomicU64::new(0),
            calls: Mutex::new(tx),
            size: Arc::new(Mutex::new(None)),
        };
        // The first size is read now, so that it is known from the start.
        let size = engine
            .query("SELECT pg_database_size(current_database())", vec![])?
            .first()
            .map(|r| u64_of(r.get(0)));
        *engine.size.lock() = size.map(|bytes| (Instant::now(), bytes));
        Ok(engine)
    }

    /// Runs `f` on the connection thread and waits for its answer.
    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = sync_channel(1);
        let sender = self.calls.lock().clone();
        sender
            .send(Box::new(move |c| {
                let _ = tx.send(f(c));
            }))
            .map_err(|_| StoreError::Unavailable("the PostgreSQL connection thread stopped".into()))?;
        rx.recv()
            .map_err(|_| StoreError::Unavailable("the PostgreSQL connection thread stopped".into()))?
    }

    pub(super) fn query(&self, sql: &'static str, params: Params) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.call(move |c| {
            let (runtime, client) = c.parts()?;
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
            let rows = runtime.block_on(client.query(sql, &refs));
            rows.map_err(unavailable)
        })
    }
}

fn serve(mut connection: Connection, rx: Receiver<Call>) {
    while let Ok(call) = rx.recv() {
        // A panic in one call (a bug) fails that call (its answer channel drops), not the
        // store: the thread goes on serving.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(&mut connection))).is_err() {
            tracing::error!("a PostgreSQL store call panicked; the connection is renewed");
            connection.client = None;
        }
    }
}

/// A range write of the attempt log as a statement (every other write is batched by
/// `Net`, by table and key).
fn range_statement(op: &Op) -> Result<Option<(&'static str, Params)>, StoreError> {
    Ok(match op {
        Op::TrimAttempts(subscription, n) => Some((
            "DELETE FROM attempts WHERE subscription = $1 AND at_nanos IN \
             (SELECT at_nanos FROM attempts WHERE subscription = $1 ORDER BY at_nanos LIMIT $2)",
            vec![Box::new(subscription.clone()), Box::new(signed(*n)?)],
        )),
        Op::TrimAttemptsThrough(subscription, through, keep) => Some((
            "DELETE FROM attempts WHERE subscription = $1 AND at_nanos <= $2 AND at_nanos <> ALL($3)",
            vec![
                Box::new(subscription.clone()),
                Box::new(clamp(*through)),
                Box::new(keep.iter().map(|k| signed(*k)).collect::<Result<Vec<i64>, _>>()?),
            ],
        )),
        Op::DeleteAttemptsOf(subscription) => Some((
            "DELETE FROM attempts WHERE subscription = $1",
            vec![Box::new(subscription.clone())],
        )),
        _ => None,
    })
}

/// A keyed row written: (group, unix seconds written, body).
type RowPut = (String, i64, Vec<u8>);

/// The net effect of a batch of writes, by table and key: the last write of a key wins
/// (a put, or a delete). Range writes (trimming a subscription's attempts) are ordered
/// against the attempts put before them by flushing those first.
#[derive(Default)]
struct Net {
    events: std::collections::HashMap<String, Option<Vec<u8>>>,
    producers: std::collections::HashMap<String, Option<(String, i64)>>,
    pending: std::collections::HashMap<i64, Option<Vec<u8>>>,
    dead: std::collections::HashMap<i64, Option<Vec<u8>>>,
    attempts: std::collections::HashMap<(String, i64), Vec<u8>>,
    raw: std::collections::HashMap<String, Option<(i64, Vec<u8>)>>,
    /// The archive time each raw message deleted was read at: only that archive goes.
    raw_deleted_at: std::collections::HashMap<String, i64>,
    subscriptions: std::collections::HashMap<String, Option<String>>,
    /// Keyed row (`store::rows`; the table is named for the mailbox index, its first
    /// user) → (group, written at, body), or deleted.
    index: std::collections::HashMap<Vec<u8>, Option<RowPut>>,
}

/// The columns a stored delivery's JSON gives its row (the shard is set by shared mode).
#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub(super) struct DeliveryKeys {
    pub(super) subscription: String,
    pub(super) event_id: String,
}

impl DeliveryKeys {
    /// A body the store wrote always parses; anything else keeps empty keys rather than
    /// failing a commit (the body itself stays as written).
    pub(super) fn of(body: &[u8]) -> DeliveryKeys {
        serde_json::from_slice(body).unwrap_or_default()
    }
}

/// Splits a map of last writes into (put keys and values, deleted keys).
fn split<K: Clone, V>(map: std::collections::HashMap<K, Option<V>>) -> (Vec<(K, V)>, Vec<K>) {
    let (mut puts, mut deletes) = (Vec::new(), Vec::new());
    for (k, v) in map {
        match v {
            Some(v) => puts.push((k, v)),
            None => deletes.push(k),
        }
    }
    (puts, deletes)
}

impl Net {
    /// The statements that apply this net effect: per table one delete and one upsert of
    /// arrays (`unnest`), whatever the number of rows.
    fn statements(&mut self, out: &mut Vec<(&'static str, Params)>) {
        let (puts, deletes) = split(std::mem::take(&mut self.events));
        if !deletes.is_empty() {
            out.push(("DELETE FROM events WHERE id = ANY($1)", vec![Box::new(deletes)]));
        }
        if !puts.is_empty() {
            let (ids, bodies): (Vec<String>, Vec<Vec<u8>>) = puts.into_iter().unzip();
            out.push((
                "INSERT INTO events (id, body) SELECT * FROM unnest($1::text[], $2::bytea[]) \
                 ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                vec![Box::new(ids), Box::new(bodies)],
            ));
        }
        let (puts, deletes) = split(std::mem::take(&mut self.producers));
        if !deletes.is_empty() {
            out.push((
                "DELETE FROM producers WHERE producer_id = ANY($1)",
                vec![Box::new(deletes)],
            ));
        }
        if !puts.is_empty() {
            let mut ids = Vec::new();
            let mut events = Vec::new();
            let mut at = Vec::new();
            for (p, (e, a)) in puts {
                ids.push(p);
                events.push(e);
                at.push(a);
            }
            out.push((
                "INSERT INTO producers (producer_id, event_id, seen_at) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) \
                 ON CONFLICT (producer_id) DO UPDATE SET event_id = excluded.event_id, seen_at = excluded.seen_at",
                vec![Box::new(ids), Box::new(events), Box::new(at)],
            ));
        }
        for (table, map) in [
            ("pending", std::mem::take(&mut self.pending)),
            ("dead_letters", std::mem::take(&mut self.dead)),
        ] {
            let (puts, deletes) = split(map);
            if !deletes.is_empty() {
                out.push((
                    if table == "pending" {
                        "DELETE FROM pending WHERE seq = ANY($1)"
                    } else {
                        "DELETE FROM dead_letters WHERE seq = ANY($1)"
                    },
                    vec![Box::new(deletes)],
                ));
            }
            if !puts.is_empty() {
                // Seq and body only: the shared mode's columns are filled by
                // `shared::prepare` when a database starts being shared (not per delivery).
                let (seqs, bodies): (Vec<i64>, Vec<Vec<u8>>) = puts.into_iter().unzip();
                out.push((
                    if table == "pending" {
                        "INSERT INTO pending (seq, body) SELECT * FROM unnest($1::bigint[], $2::bytea[]) \
                         ON CONFLICT (seq) DO UPDATE SET body = excluded.body"
                    } else {
                        "INSERT INTO dead_letters (seq, body) SELECT * FROM unnest($1::bigint[], $2::bytea[]) \
                         ON CONFLICT (seq) DO UPDATE SET body = excluded.body"
                    },
                    vec![Box::new(seqs), Box::new(bodies)],
                ));
            }
        }
        self.flush_attempts(out);
        let (puts, deletes) = split(std::mem::take(&mut self.raw));
        if !deletes.is_empty() {
            let deleted_at = std::mem::take(&mut self.raw_deleted_at);
            let at: Vec<i64> = deletes
                .iter()
                .map(|sha| deleted_at.get(sha).copied().unwrap_or(0))
                .collect();
            // A message archived again since the purge read it is newer, and stays.
            out.push((
                "DELETE FROM raw_messages r USING unnest($1::text[], $2::bigint[]) AS x(s, a) \
                 WHERE r.sha256 = x.s AND r.archived_at = x.a",
                vec![Box::new(deletes), Box::new(at)],
            ));
        }
        if !puts.is_empty() {
            let mut shas = Vec::new();
            let mut at = Vec::new();
            let mut messages = Vec::new();
            for (sha, (a, m)) in puts {
                shas.push(sha);
                at.push(a);
                messages.push(m);
            }
            out.push((
                "INSERT INTO raw_messages (sha256, archived_at, message) \
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[]) \
                 ON CONFLICT (sha256) DO UPDATE SET archived_at = excluded.archived_at, message = excluded.message",
                vec![Box::new(shas), Box::new(at), Box::new(messages)],
            ));
        }
        let (puts, deletes) = split(std::mem::take(&mut self.index));
        if !deletes.is_empty() {
            out.push(("DELETE FROM mailbox_index WHERE key = ANY($1)", vec![Box::new(deletes)]));
        }
        if !puts.is_empty() {
            let mut keys = Vec::new();
            let mut users = Vec::new();
            let mut at = Vec::new();
            let mut bodies = Vec::new();
            for (key, (user, seen, body)) in puts {
                keys.push(key);
                users.push(user);
                at.push(seen);
                bodies.push(body);
            }
            out.push((
                "INSERT INTO mailbox_index (key, user_name, seen_at, body) \
                 SELECT * FROM unnest($1::bytea[], $2::text[], $3::bigint[], $4::bytea[]) \
                 ON CONFLICT (key) DO UPDATE SET user_name = excluded.user_name, seen_at = excluded.seen_at, \
                 body = excluded.body",
                vec![Box::new(keys), Box::new(users), Box::new(at), Box::new(bodies)],
            ));
        }
        let (puts, deletes) = split(std::mem::take(&mut self.subscriptions));
        if !deletes.is_empty() {
            out.push(("DELETE FROM subscriptions WHERE uid = ANY($1)", vec![Box::new(deletes)]));
        }
        if !puts.is_empty() {
            let (uids, namespaces): (Vec<String>, Vec<String>) = puts.into_iter().unzip();
            out.push((
                "INSERT INTO subscriptions (uid, namespace) SELECT * FROM unnest($1::text[], $2::text[]) \
                 ON CONFLICT (uid) DO UPDATE SET namespace = excluded.namespace",
                vec![Box::new(uids), Box::new(namespaces)],
            ));
        }
    }

    fn flush_attempts(&mut self, out: &mut Vec<(&'static str, Params)>) {
        if self.attempts.is_empty() {
            return;
        }
        let mut subscriptions = Vec::new();
        let mut keys = Vec::new();
        let mut bodies = Vec::new();
        for ((s, k), b) in std::mem::take(&mut self.attempts) {
            subscriptions.push(s);
            keys.push(k);
            bodies.push(b);
        }
        out.push((
            "INSERT INTO attempts (subscription, at_nanos, body) \
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[]) \
             ON CONFLICT (subscription, at_nanos) DO UPDATE SET body = excluded.body",
            vec![Box::new(subscriptions), Box::new(keys), Box::new(bodies)],
        ));
    }
}

/// One group commit as a few statements: the net effect per table, with each range write
/// of the attempt log kept in its place.
/// A statement and its parameters.
pub(super) type Statement = (&'static str, Params);

fn batched(ops: &[&Op]) -> Result<(Vec<Statement>, u64), StoreError> {
    let mut net = Net::default();
    let mut paged = PagedWrites::default();
    let mut shared = super::shared::SharedWrites::default();
    let mut out = Vec::new();
    let mut checkpoints: Vec<Statement> = Vec::new();
    for op in ops {
        match op {
            Op::PutEvent(id, body) => {
                net.events.insert(id.clone(), Some(body.clone()));
            }
            Op::DeleteEvent(id) => {
                net.events.insert(id.clone(), None);
            }
            Op::PutProducer(p, id, at) => {
                net.producers.insert(p.clone(), Some((id.clone(), *at)));
            }
            Op::DeleteProducer(p) => {
                net.producers.insert(p.clone(), None);
            }
            Op::PutPending(seq, body) => {
                net.pending.insert(signed(*seq)?, Some(body.clone()));
            }
            Op::DeletePending(seq) => {
                net.pending.insert(signed(*seq)?, None);
            }
            Op::PutDead(seq, body) => {
                net.dead.insert(signed(*seq)?, Some(body.clone()));
            }
            Op::DeleteDead(seq) => {
                net.dead.insert(signed(*seq)?, None);
            }
            Op::PutAttempt(subscription, key, body) => {
                net.attempts.insert((subscription.clone(), signed(*key)?), body.clone());
            }
            Op::TrimAttempts(..) | Op::TrimAttemptsThrough(..) | Op::DeleteAttemptsOf(_) => {
                // Range writes see every attempt put before them, and none after.
                net.flush_attempts(&mut out);
                out.extend(range_statement(op)?);
            }
            Op::PutRaw(sha256, at, message) => {
                net.raw.insert(sha256.clone(), Some((*at, message.clone())));
            }
            Op::DeleteRaw(at, sha256) => match net.raw.get(sha256) {
                // Archived again in this commit: it stays.
                Some(Some((put_at, _))) if put_at != at => {}
                _ => {
                    net.raw.insert(sha256.clone(), None);
                    net.raw_deleted_at.insert(sha256.clone(), *at);
                }
            },
            Op::PutSubscription(uid, namespace) => {
                net.subscriptions.insert(uid.clone(), Some(namespace.clone()));
            }
            Op::DeleteSubscription(uid) => {
                net.subscriptions.insert(uid.clone(), None);
            }
            Op::PutRow(key, group, at, body) => {
                net.index.insert(key.clone(), Some((group.clone(), *at, body.clone())));
            }
            Op::DeleteRow(key) => {
                net.index.insert(key.clone(), None);
            }
            Op::Ingest(_) => {} // run first, by `commit` (its statements depend on answers)
            Op::Fenced(seq, epoch, write) => {
                shared.fenced(signed(*seq)?, signed(*epoch)?, write);
            }
            Op::PutClaimed(seq, epoch, shard, body) => {
                let shard =
                    i32::try_from(*shard).map_err(|_| StoreError::Failed(format!("shard {shard} out of range")))?;
                shared.claimed(signed(*seq)?, signed(*epoch)?, shard, body.clone());
            }
            Op::DeleteEventIfUnused(id) => shared.unused_events.push(id.clone()),
            Op::DeleteDeliveriesOf(uid) => shared.forgotten.push(uid.clone()),
            Op::DropDead(seq) => shared.drop_dead(signed(*seq)?),
            Op::PutCountedEvent(id, body, n) => {
                paged
                    .events
                    .insert(id.clone(), (body.clone(), i32::try_from(*n).unwrap_or(i32::MAX)));
            }
            Op::ReleaseEvent(id) => *paged.released.entry(id.clone()).or_default() += 1,
            Op::Enqueue(q) => {
                let event = DeliveryKeys::of(&q.body).event_id;
                paged.queue.insert(
                    (q.subscription.clone(), signed(q.seq)?),
                    Some((clamp(q.due), event, q.body.clone())),
                );
                paged.seq(q.seq);
            }
            Op::Dequeue { subscription, seq, .. } => {
                paged.queue.insert((subscription.clone(), signed(*seq)?), None);
            }
            Op::Bury(subscription, seq, at, body) => {
                let event = DeliveryKeys::of(body).event_id;
                paged.dead.insert(
                    (subscription.clone(), signed(*seq)?),
                    Some((clamp(*at), event, body.clone())),
                );
                paged.seq(*seq);
            }
            Op::Unbury(subscription, seq, _) => {
                paged.dead.insert((subscription.clone(), signed(*seq)?), None);
            }
            Op::Stats(subscription, queued, bytes, dead) => {
                let s = paged.stats.entry(subscription.clone()).or_default();
                s.0 += queued;
                s.1 += bytes;
                s.2 += dead;
            }
            Op::ForgetQueue(subscription) => {
                // A barrier: the writes before it reach the tables first, so that it
                // releases exactly the rows there are.
                std::mem::take(&mut paged).statements(&mut out);
                PagedWrites {
                    forgotten: vec![subscription.clone()],
                    ..PagedWrites::default()
                }
                .statements(&mut out);
            }
            Op::PutAgedProducer(p, id, at) => {
                net.producers.insert(p.clone(), Some((id.clone(), *at)));
            }
            Op::DeleteAgedProducer(p, _) => {
                net.producers.insert(p.clone(), None);
            }
            Op::NextSeq(n) => paged.seq(n.saturating_sub(1)),
            // Appended last in the transaction (`append_audit`), in the order given.
            Op::Audit(_) => {}
            Op::AuditCheckpoint(size, note) => checkpoints.push((
                "INSERT INTO audit_checkpoints (size, note) VALUES ($1, $2) ON CONFLICT (size) DO NOTHING",
                vec![Box::new(signed(*size)?), Box::new(note.clone())],
            )),
        }
    }
    out.append(&mut checkpoints);
    net.statements(&mut out);
    paged.statements(&mut out);
    shared.statements(&mut out);
    Ok((out, shared.expected))
}

/// Unix nanoseconds as a bigint (the store's keys stay below 2^63 until the year 2262;
/// a bound past that is the largest bigint).
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A queued delivery or dead letter written: (due or given-up time, event id, body), or
/// deleted.
type PagedRow = Option<(i64, String, Vec<u8>)>;

/// The paged store's writes of one commit, net by key.
#[derive(Default)]
struct PagedWrites {
    /// Events with their reference counts.
    events: std::collections::HashMap<String, (Vec<u8>, i32)>,
    released: std::collections::HashMap<String, i32>,
    queue: std::collections::HashMap<(String, i64), PagedRow>,
    dead: std::collections::HashMap<(String, i64), PagedRow>,
    stats: std::collections::HashMap<String, (i64, i64, i64)>,
    forgotten: Vec<String>,
    next_seq: Option<u64>,
}

impl PagedWrites {
    fn seq(&mut self, seq: u64) {
        self.next_seq = Some(self.next_seq.unwrap_or(0).max(seq + 1));
    }

    fn statements(self, out: &mut Vec<(&'static str, Params)>) {
        if !self.events.is_empty() {
            let mut ids = Vec::new();
            let mut bodies = Vec::new();
            let mut refs = Vec::new();
            for (id, (body, n)) in self.events {
                ids.push(id);
                bodies.push(body);
                refs.push(n);
            }
            out.push((
                "INSERT INTO events (id, body, refs) SELECT * FROM unnest($1::text[], $2::bytea[], $3::int[]) \
                 ON CONFLICT (id) DO UPDATE SET body = excluded.body, refs = events.refs + excluded.refs",
                vec![Box::new(ids), Box::new(bodies), Box::new(refs)],
            ));
        }
        // A forgotten subscription's rows release their events before they go.
        let mut released: Vec<String> = Vec::new();
        if !self.forgotten.is_empty() {
            out.push((
                "UPDATE events e SET refs = e.refs - c.n FROM ( \
                   SELECT event_id, count(*)::int AS n FROM ( \
                     SELECT event_id FROM queue WHERE subscription = ANY($1) \
                     UNION ALL SELECT event_id FROM dead_queue WHERE subscription = ANY($1)) r \
                   GROUP BY event_id) c WHERE e.id = c.event_id",
                vec![Box::new(self.forgotten.clone())],
            ));
            out.push((
                "DELETE FROM events WHERE refs <= 0 AND id IN ( \
                   SELECT event_id FROM queue WHERE subscription = ANY($1) \
                   UNION SELECT event_id FROM dead_queue WHERE subscription = ANY($1))",
                vec![Box::new(self.forgotten.clone())],
            ));
            out.push((
                "DELETE FROM queue WHERE subscription = ANY($1)",
                vec![Box::new(self.forgotten.clone())],
            ));
            out.push((
                "DELETE FROM dead_queue WHERE subscription = ANY($1)",
                vec![Box::new(self.forgotten.clone())],
            ));
            out.push((
                "DELETE FROM queue_stats WHERE uid = ANY($1)",
                vec![Box::new(self.forgotten)],
            ));
        }
        for (table, rows) in [("queue", self.queue), ("dead_queue", self.dead)] {
            let (mut del_s, mut del_q) = (Vec::new(), Vec::new());
            let (mut put_s, mut put_q, mut put_t, mut put_e, mut put_b) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ((subscription, seq), row) in rows {
                match row {
                    None => {
                        del_s.push(subscription);
                        del_q.push(seq);
                    }
                    Some((t, e, b)) => {
                        put_s.push(subscription);
                        put_q.push(seq);
                        put_t.push(t);
                        put_e.push(e);
                        put_b.push(b);
                    }
                }
            }
            if !del_s.is_empty() {
                out.push((
                    if table == "queue" {
                        "DELETE FROM queue q USING unnest($1::text[], $2::bigint[]) AS x(s, q) \
                         WHERE q.subscription = x.s AND q.seq = x.q"
                    } else {
                        "DELETE FROM dead_queue q USING unnest($1::text[], $2::bigint[]) AS x(s, q) \
                         WHERE q.subscription = x.s AND q.seq = x.q"
                    },
                    vec![Box::new(del_s), Box::new(del_q)],
                ));
            }
            if !put_s.is_empty() {
                out.push((
                    if table == "queue" {
                        "INSERT INTO queue (subscription, seq, due, event_id, body) \
                         SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::bytea[]) \
                         ON CONFLICT (subscription, seq) DO UPDATE SET due = excluded.due, body = excluded.body"
                    } else {
                        "INSERT INTO dead_queue (subscription, seq, dead_at, event_id, body) \
                         SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::bytea[]) \
                         ON CONFLICT (subscription, seq) DO UPDATE SET dead_at = excluded.dead_at, body = excluded.body"
                    },
                    vec![
                        Box::new(put_s),
                        Box::new(put_q),
                        Box::new(put_t),
                        Box::new(put_e),
                        Box::new(put_b),
                    ],
                ));
            }
        }
        if !self.released.is_empty() {
            let (ids, counts): (Vec<String>, Vec<i32>) = self.released.into_iter().unzip();
            released.extend(ids.iter().cloned());
            out.push((
                "UPDATE events e SET refs = e.refs - x.n FROM unnest($1::text[], $2::int[]) AS x(id, n) \
                 WHERE e.id = x.id",
                vec![Box::new(ids), Box::new(counts)],
            ));
            out.push((
                "DELETE FROM events WHERE id = ANY($1) AND refs <= 0",
                vec![Box::new(released)],
            ));
        }
        if !self.stats.is_empty() {
            let mut uids = Vec::new();
            let (mut q, mut b, mut d) = (Vec::new(), Vec::new(), Vec::new());
            for (uid, (dq, db, dd)) in self.stats {
                uids.push(uid);
                q.push(dq);
                b.push(db);
                d.push(dd);
            }
            out.push((
                "INSERT INTO queue_stats (uid, queued, bytes, dead) SELECT u, 0, 0, 0 FROM unnest($1::text[]) AS u \
                 ON CONFLICT (uid) DO NOTHING",
                vec![Box::new(uids.clone())],
            ));
            out.push((
                "UPDATE queue_stats s SET queued = GREATEST(s.queued + x.q, 0), bytes = GREATEST(s.bytes + x.b, 0), \
                 dead = GREATEST(s.dead + x.d, 0) \
                 FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) AS x(u, q, b, d) WHERE s.uid = x.u",
                vec![Box::new(uids.clone()), Box::new(q), Box::new(b), Box::new(d)],
            ));
            out.push((
                "DELETE FROM queue_stats WHERE uid = ANY($1) AND queued = 0 AND bytes = 0 AND dead = 0",
                vec![Box::new(uids)],
            ));
        }
        if let Some(next) = self.next_seq {
            out.push((
                "INSERT INTO store_counters (name, value) VALUES ('next_seq', $1) \
                 ON CONFLICT (name) DO UPDATE SET value = GREATEST(store_counters.value, excluded.value)",
                vec![Box::new(clamp(next))],
            ));
        }
    }
}

/// The audit log's head: its size and packed frontier.
type Head = (u64, Vec<u8>);

/// Where an append starts and what it leaves: the first leaf's index, the transaction's
/// id (0 when not asked), and the new head (size, packed frontier).
struct Appended {
    first: u64,
    xid: i64,
    head: (u64, Vec<u8>),
}

/// Appends leaves to the audit log inside `txn`, last in it.
///
/// Shared by several replicas (`sole` None), the head row's lock orders every replica's
/// appends and is held until the commit. Both statements are prepared before the lock is
/// taken (with the lock timeout, in one round trip), so it is held for two round trips and
/// the COMMIT: one locks and reads the head with its frontier, one writes hashes, records,
/// acceptances and the new head.
///
/// The sole owner (`sole`: `APPEND_AT` prepared, and the head after its last commit when
/// known) is the only writer while it holds the store-wide lock: it appends from the head
/// it knows, in one round trip, on the condition that the head is still there (an edited
/// or restored store fails the commit, and the head is read again).
async fn append_audit(
    txn: &tokio_postgres::Transaction<'_>,
    leaves: &[crate::audit::Leaf],
    sole: Option<(&tokio_postgres::Statement, Option<Head>)>,
) -> Result<Result<Appended, crate::audit::TreeError>, tokio_postgres::Error> {
    let (size, packed, xid, write) = match sole {
        Some((write, Some((size, packed)))) => (size, packed, 0, write.clone()),
        Some((write, None)) => {
            let head = txn
                .query_one("SELECT size, frontier FROM audit_head WHERE id = 1", &[])
                .await?;
            (u64_of(head.get(0)), head.get(1), 0, write.clone())
        }
        None => {
            // A commit that cannot have the head within 10 s fails (and is retried)
            // rather than wait on a stuck transaction.
            let (_, lock, write) = tokio::try_join!(
                txn.batch_execute("SET LOCAL lock_timeout = '10s'"),
                txn.prepare("SELECT size, frontier, txid_current() FROM audit_head WHERE id = 1 FOR UPDATE"),
                txn.prepare(APPEND_AT),
            )?;
            let head = txn.query_one(&lock, &[]).await?;
            (u64_of(head.get(0)), head.get(1), head.get(2), write)
        }
    };
    // A head that does not hold the tree's frontier (an edited store) fails the append, and
    // with it the commit: the log does not grow on a history it cannot vouch for.
    let (stored, grown) = match crate::audit::append_packed(size, &packed, leaves) {
        Ok(appended) => appended,
        Err(e) => return Ok(Err(e)),
    };
    let (idx, hashes): (Vec<i64>, Vec<Vec<u8>>) = stored.into_iter().map(|(i, h)| (clamp(i), h.0.to_vec())).unzip();
    let n: Vec<i64> = (0..leaves.len() as u64).map(|i| clamp(size + i)).collect();
    let bodies: Vec<&[u8]> = leaves.iter().map(|l| l.bytes.as_slice()).collect();
    let events: Vec<Option<&str>> = leaves.iter().map(|l| l.event_id.as_deref()).collect();
    let (accepted, accepted_at): (Vec<&str>, Vec<i64>) = leaves
        .iter()
        .zip(&n)
        .filter(|(l, _)| crate::audit::Record::is_acceptance(&l.bytes))
        .filter_map(|(l, i)| Some((l.event_id.as_deref()?, *i)))
        .unzip();
    let new_size = size + leaves.len() as u64;
    let written = txn
        .execute(
            &write,
            &[
                &idx,
                &hashes,
                &n,
                &bodies,
                &events,
                &clamp(new_size),
                &grown,
                &accepted,
                &accepted_at,
                &clamp(size),
            ],
        )
        .await?;
    if written != 1 {
        return Ok(Err(crate::audit::TreeError::Tlog(format!(
            "the log's head is no longer at size {size}: another writer, or an edited store"
        ))));
    }
    Ok(Ok(Appended {
        first: size,
        xid,
        head: (new_size, grown),
    }))
}

/// Writes an append: the new stored hashes, the records, each acceptance's index, and the
/// head (the new size and frontier), if the head is still at the size the append grew
/// from ($10); the count of heads updated tells.
const APPEND_AT: &str = "WITH h AS (INSERT INTO audit_hashes (idx, hash) SELECT * FROM unnest($1::bigint[], $2::bytea[])), \
      r AS (INSERT INTO audit_records (idx, body, event_id) \
            SELECT * FROM unnest($3::bigint[], $4::bytea[], $5::text[])), \
      a AS (INSERT INTO audit_accepted (event_id, idx) \
            SELECT * FROM unnest($8::text[], $9::bigint[]) ON CONFLICT (event_id) DO NOTHING) \
 UPDATE audit_head SET size = $6, frontier = $7 WHERE id = 1 AND size = $10";

/// Whether the transaction that appended audit leaves from `first` committed, for a
/// COMMIT whose answer was lost: asked on a connection of its own (it takes no store lock),
/// once the log's head is free, i.e. once that transaction has ended either way, by
/// reading back the leaf at `first` (the data, not the transaction id: an id can be
/// handed out again after a failover). None when it cannot be told within `patience`.
fn landed(c: &Connection, first: u64, bytes: &[u8], patience: std::time::Duration) -> Option<bool> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ask = async {
            let mut client = c.database.connect().await.ok()?;
            let txn = client.transaction().await.ok()?;
            let read = async {
                let wait = format!("SET LOCAL lock_timeout = '{}ms'", left.as_millis().max(1));
                txn.batch_execute(&wait).await.ok()?;
                txn.query_one("SELECT size FROM audit_head WHERE id = 1 FOR UPDATE", &[])
                    .await
                    .ok()?;
                txn.query_opt("SELECT body FROM audit_records WHERE idx = $1", &[&clamp(first)])
                    .await
                    .ok()
            }
            .await;
            // Ended now, whatever was read, not whenever this runtime next runs: every
            // replica's commits wait for the head.
            let _ = txn.rollback().await;
            Some(read?.is_some_and(|r| r.get::<_, Vec<u8>>(0) == bytes))
        };
        let answer = c.runtime.block_on(async {
            let answer = tokio::time::timeout(left, ask).await.ok().flatten();
            // A connection given up on mid-way closes now: its task runs on this runtime.
            tokio::task::yield_now().await;
            answer
        });
        if answer.is_some() || tokio::time::Instant::now() >= deadline {
            return answer;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// Audit leaves a commit appended whose COMMIT's answer was lost, when it could not be told
/// whether it landed: asked again before the next commit (see `Connection::landed`).
pub(super) struct Unsure {
    first: u64,
    leaves: Vec<Vec<u8>>,
}

/// Leaves known to be in the log though their commit was reported failed: the committer
/// retries what it keeps, leaves and all, and a retried leaf is not appended again. Each is
/// dropped once it came back; all are forgotten after an hour (their jobs were given up).
#[derive(Default)]
pub(super) struct Landed {
    leaves: std::collections::HashMap<Vec<u8>, u64>,
    since: Option<Instant>,
}

impl Landed {
    fn add(&mut self, unsure: &Unsure) {
        self.leaves.extend(unsure.leaves.iter().cloned().zip(unsure.first..));
        self.since.get_or_insert_with(Instant::now);
    }

    /// Removes from `leaves` those already in the log, telling each its index; returns
    /// them, to be forgotten once the commit that carried them again is done (if it fails,
    /// they come back once more).
    fn skip(&mut self, leaves: &mut Vec<crate::audit::Leaf>) -> Vec<Vec<u8>> {
        if self
            .since
            .is_some_and(|t| t.elapsed() > std::time::Duration::from_secs(3600))
        {
            *self = Landed::default();
        }
        let mut skipped = Vec::new();
        if self.leaves.is_empty() {
            return skipped;
        }
        leaves.retain(|leaf| match self.leaves.get(&leaf.bytes) {
            Some(index) => {
                leaf.committed_at(*index);
                skipped.push(leaf.bytes.clone());
                false
            }
            None => true,
        });
        skipped
    }

    fn forget(&mut self, skipped: &[Vec<u8>]) {
        for bytes in skipped {
            self.leaves.remove(bytes);
        }
        if self.leaves.is_empty() {
            self.since = None;
        }
    }
}

/// Settles an earlier commit whose outcome was unknown, into `c.landed` when it landed:
/// false while it still cannot be told.
fn settle(c: &mut Connection, unsure: Unsure, patience: std::time::Duration) -> bool {
    let Some(first_leaf) = unsure.leaves.first() else {
        return true;
    };
    match landed(c, unsure.first, first_leaf, patience) {
        Some(true) => {
            c.landed.add(&unsure);
            true
        }
        Some(false) => true,
        None => {
            c.unsure = Some(unsure);
            false
        }
    }
}

/// How a commit's transaction ended.
enum Ended {
    /// Committed; with the log's head after it, when known.
    Done((Vec<Vec<crate::store::Appended>>, u64), Option<(u64, Vec<u8>)>),
    Failed(StoreError),
    /// COMMIT was sent and its answer lost, after appending audit leaves from `first` in
    /// the transaction `xid`.
    Unsure {
        xid: i64,
        error: StoreError,
        first: u64,
        audit: Vec<crate::audit::Leaf>,
        done: (Vec<Vec<crate::store::Appended>>, u64),
    },
}

/// Rolls `txn` back within 5 s; false when the server did not answer (the caller drops the
/// connection, which ends the transaction on the server).
async fn rolled_back(txn: tokio_postgres::Transaction<'_>) -> bool {
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(5), txn.rollback()).await,
        Ok(Ok(()))
    )
}

pub(super) fn u64_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl Engine for Postgres {
    fn commit(&self, ops: &[&Op]) -> Result<(), StoreError> {
        let (statements, fenced) = batched(ops)?;
        let leaves: Vec<crate::audit::Leaf> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Audit(leaf) => Some(leaf.as_ref().clone()),
                _ => None,
            })
            .collect();
        let ingests = super::shared::ingests(ops);
        let answered = ingests.iter().map(|b| b.outcome.clone()).collect::<Vec<_>>();
        let (outcomes, matched) = self.call(move |c| {
            // Leaves of an earlier commit whose outcome was unknown are not appended again
            // when it landed. Asked briefly: every store call waits on this thread.
            let mut leaves = leaves;
            if let Some(unsure) = c.unsure.take()
                && !settle(c, unsure, std::time::Duration::from_secs(5))
            {
                return Err(StoreError::Unavailable(
                    "PostgreSQL: cannot yet tell whether an earlier commit landed".into(),
                ));
            }
            let skipped = c.landed.skip(&mut leaves);
            // A connection that died while idle fails at BEGIN: nothing was applied, so
            // connect again and try once more. A failure later rolls back and is reported.
            for attempt in 0..2 {
                // The sole owner appends from the head it knows, with its statement
                // prepared once per connection.
                let sole = if c.exclusive {
                    c.client()?;
                    if c.append_at.is_none() {
                        let (runtime, client) = c.parts()?;
                        match runtime.block_on(client.prepare(APPEND_AT)) {
                            Ok(statement) => c.append_at = Some(statement),
                            Err(e) if attempt == 0 => {
                                c.client = None;
                                tracing::debug!(err = %e, "cannot prepare the audit append; connecting again");
                                continue;
                            }
                            Err(e) => return Err(unavailable(e)),
                        }
                    }
                    c.append_at.clone().map(|statement| (statement, c.head.clone()))
                } else {
                    None
                };
                // Known again only once this commit is done.
                c.head = None;
                let (runtime, client) = c.parts()?;
                let mut unheard = false;
                let result = runtime.block_on(async {
                    let txn = match client.transaction().await {
                        Ok(txn) => txn,
                        Err(e) => return Err((true, e)),
                    };
                    let mut audit = Vec::new();
                    let staged = async {
                        let outcomes = super::shared::ingest(&txn, &ingests, &mut audit).await?;
                        let mut matched = 0;
                        // One after the other: a handful of statements per commit, in order.
                        for (sql, params) in &statements {
                            let refs: Vec<&(dyn ToSql + Sync)> =
                                params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
                            if *sql == super::shared::FENCED_COMPLETE {
                                // Counts what it deleted in its one row.
                                let row = txn.query_one(*sql, &refs).await?;
                                matched += u64_of(row.get(0));
                                continue;
                            }
                            let n = txn.execute(*sql, &refs).await?;
                            if *sql == super::shared::FENCED_DELETE || *sql == super::shared::FENCED_UPDATE {
                                matched += n;
                            }
                        }
                        audit.extend(leaves.iter().cloned());
                        let appended = if audit.is_empty() {
                            Ok(None)
                        } else {
                            let sole = sole.as_ref().map(|(statement, head)| (statement, head.clone()));
                            append_audit(&txn, &audit, sole).await?.map(Some)
                        };
                        Ok::<_, tokio_postgres::Error>(appended.map(|a| (outcomes, matched, a)))
                    }
                    .await;
                    let (outcomes, matched, appended) = match staged {
                        Ok(Ok(staged)) => staged,
                        // Rolled back now, not when this runtime next runs: the head's lock
                        // may be held, and every replica's commits wait for it.
                        Ok(Err(broken)) => {
                            unheard = !rolled_back(txn).await;
                            return Ok(Ended::Failed(StoreError::Failed(broken.to_string())));
                        }
                        Err(e) => {
                            unheard = !rolled_back(txn).await;
                            return Err((false, e));
                        }
                    };
                    if let Err(e) = txn.commit().await {
                        return Ok(match appended {
                            // Sent, but no answer: it may have committed, and a retry of
                            // one that did would log its leaves twice. Asked below.
                            Some(a) => Ended::Unsure {
                                xid: a.xid,
                                error: unavailable(e),
                                first: a.first,
                                audit,
                                done: (outcomes, matched),
                            },
                            None => Ended::Failed(unavailable(e)),
                        });
                    }
                    let head = match appended {
                        Some(a) => {
                            for (leaf, index) in audit.iter().zip(a.first..) {
                                leaf.committed_at(index);
                            }
                            Some(a.head)
                        }
                        // Nothing appended: the head is where it was.
                        None => sole.and_then(|(_, head)| head),
                    };
                    Ok(Ended::Done((outcomes, matched), head))
                });
                if unheard {
                    // The server ends the transaction when the connection goes, and it goes
                    // now: its task runs on this runtime.
                    c.client = None;
                    c.runtime.block_on(tokio::task::yield_now());
                }
                match result {
                    Ok(Ended::Done(done, head)) => {
                        if c.exclusive {
                            c.head = head;
                        }
                        c.landed.forget(&skipped);
                        return Ok(done);
                    }
                    Ok(Ended::Failed(error)) => return Err(error),
                    Ok(Ended::Unsure {
                        xid,
                        error,
                        first,
                        audit,
                        done,
                    }) => {
                        c.client = None;
                        let leaves_bytes: Vec<Vec<u8>> = audit.iter().map(|l| l.bytes.clone()).collect();
                        let first_leaf = leaves_bytes.first().cloned().unwrap_or_default();
                        match landed(c, first, &first_leaf, std::time::Duration::from_secs(15)) {
                            Some(true) => {
                                tracing::warn!("PostgreSQL's answer to a COMMIT was lost, but it committed");
                                for (leaf, index) in audit.iter().zip(first..) {
                                    leaf.committed_at(index);
                                }
                                c.landed.forget(&skipped);
                                return Ok(done);
                            }
                            Some(false) => {
                                tracing::warn!(xid, "a COMMIT's answer was lost and it did not land: it is retried");
                            }
                            None => {
                                tracing::warn!(
                                    xid,
                                    "a COMMIT's answer was lost and whether it landed cannot be told yet: it is asked again before the next commit, which does not log its leaves twice"
                                );
                                c.unsure = Some(Unsure {
                                    first,
                                    leaves: leaves_bytes,
                                });
                            }
                        }
                        return Err(error);
                    }
                    Err((true, _)) if attempt == 0 => {
                        c.client = None;
                    }
                    Err((_, e)) => return Err(unavailable(e)),
                }
            }
            Err(StoreError::Unavailable("PostgreSQL: cannot begin a transaction".into()))
        })?;
        let refused = fenced.saturating_sub(matched);
        if refused > 0 {
            self.fenced.fetch_add(refused, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                refused,
                "delivery writes refused: their shard was taken over by another replica, which delivers them now"
            );
        }
        // Only once committed: an ingest that failed learns nothing.
        for (slot, outcome) in answered.into_iter().zip(outcomes) {
            *slot.lock() = Some(outcome);
        }
        Ok(())
    }

    fn load(&self) -> Result<Loaded, StoreError> {
        let mut loaded = Loaded::default();
        for r in self.query("SELECT seq, body FROM pending ORDER BY seq", vec![])? {
            loaded.pending.push((u64_of(r.get(0)), r.get(1)));
        }
        for r in self.query("SELECT seq, body FROM dead_letters ORDER BY seq", vec![])? {
            loaded.dead.push((u64_of(r.get(0)), r.get(1)));
        }
        for r in self.query("SELECT producer_id, event_id, seen_at FROM producers", vec![])? {
            loaded.producers.push((r.get(0), r.get(1), r.get(2)));
        }
        for r in self.query("SELECT uid, namespace FROM subscriptions", vec![])? {
            loaded.subscriptions.push((r.get(0), r.get(1)));
        }
        for r in self.query("SELECT subscription, at_nanos FROM attempts", vec![])? {
            loaded.attempt_keys.push((r.get(0), u64_of(r.get(1))));
        }
        Ok(loaded)
    }

    fn event(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let rows = self.query("SELECT body FROM events WHERE id = $1", vec![Box::new(id.to_string())])?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    fn events_by_id(&self, ids: &[String]) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self
            .query(
                "SELECT id, body FROM events WHERE id = ANY($1)",
                vec![Box::new(ids.to_vec())],
            )?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    fn events_indexed(&self, ids: &[String]) -> Result<Vec<crate::store::durable::engine::IndexedEvent>, StoreError> {
        // The acceptance index in the same read: one probe of each small index per id.
        Ok(self
            .query(
                "SELECT e.id, e.body, a.idx FROM events e LEFT JOIN audit_accepted a ON a.event_id = e.id \
                 WHERE e.id = ANY($1)",
                vec![Box::new(ids.to_vec())],
            )?
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get::<_, Option<i64>>(2).map(u64_of)))
            .collect())
    }

    fn event_count(&self) -> Result<u64, StoreError> {
        let rows = self.query("SELECT count(*) FROM events", vec![])?;
        Ok(rows.first().map_or(0, |r| u64_of(r.get(0))))
    }

    fn deliveries(&self, table: Deliveries, seqs: &[u64]) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let seqs: Vec<i64> = seqs.iter().map(|s| signed(*s)).collect::<Result<_, _>>()?;
        let sql = match table {
            Deliveries::Pending => "SELECT seq, body FROM pending WHERE seq = ANY($1) ORDER BY seq",
            Deliveries::Dead => "SELECT seq, body FROM dead_letters WHERE seq = ANY($1) ORDER BY seq",
        };
        // In the order asked for, as the redb engine answers.
        let mut found: std::collections::HashMap<i64, Vec<u8>> = self
            .query(sql, vec![Box::new(seqs.clone())])?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        Ok(seqs
            .iter()
            .filter_map(|s| found.remove(s).map(|b| (u64_of(*s), b)))
            .collect())
    }

    fn raw(&self, sha256: &str) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        let rows = self.query(
            "SELECT archived_at, message FROM raw_messages WHERE sha256 = $1",
            vec![Box::new(sha256.to_string())],
        )?;
        Ok(rows.first().map(|r| (r.get(0), r.get(1))))
    }

    fn raw_before(&self, before: i64) -> Result<Vec<(i64, String)>, StoreError> {
        Ok(self
            .query(
                "SELECT archived_at, sha256 FROM raw_messages WHERE archived_at < $1 ORDER BY archived_at, sha256",
                vec![Box::new(before)],
            )?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    fn secret(&self, name: &str) -> Result<[u8; 32], StoreError> {
        let fresh = crate::crypto::random_bytes().to_vec();
        // Created once: a concurrent first use keeps the one that was inserted first.
        let rows = self.query(
            // DO UPDATE (of nothing) rather than DO NOTHING: it returns the row that won,
            // also when another session inserted it a moment ago.
            "INSERT INTO meta (name, value) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET name = excluded.name RETURNING value",
            vec![Box::new(name.to_string()), Box::new(fresh)],
        )?;
        let value: Vec<u8> = rows
            .first()
            .map(|r| r.get(0))
            .ok_or_else(|| StoreError::Failed(format!("the secret {name} was neither found nor created")))?;
        <[u8; 32]>::try_from(value.as_slice())
            .map_err(|_| StoreError::Failed(format!("the secret {name} in the database is not 32 bytes")))
    }

    fn attempts(&self, subscription: &str, from: u64, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self
            .query(
                "SELECT body FROM attempts WHERE subscription = $1 AND at_nanos >= $2 ORDER BY at_nanos DESC LIMIT $3",
                vec![
                    Box::new(subscription.to_string()),
                    Box::new(clamp(from)),
                    Box::new(i64::try_from(limit).unwrap_or(i64::MAX)),
                ],
            )?
            .into_iter()
            .map(|r| r.get(0))
            .collect())
    }

    fn oldest_attempts(&self, subscription: &str, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .query(
                "SELECT at_nanos, body FROM attempts WHERE subscription = $1 ORDER BY at_nanos LIMIT $2",
                vec![
                    Box::new(subscription.to_string()),
                    Box::new(i64::try_from(limit).unwrap_or(i64::MAX)),
                ],
            )?
            .into_iter()
            .map(|r| (u64_of(r.get(0)), r.get(1)))
            .collect())
    }

    fn attempts_before(&self, subscription: &str, before: u64) -> Result<u64, StoreError> {
        let rows = self.query(
            "SELECT count(*) FROM attempts WHERE subscription = $1 AND at_nanos < $2",
            vec![Box::new(subscription.to_string()), Box::new(clamp(before))],
        )?;
        Ok(rows.first().map_or(0, |r| u64_of(r.get(0))))
    }

    /// Never waits for the server: ingest asks on every request and the status writer on
    /// every pass, both from async code. The answer is the size read at most a second
    /// ago; a stale one asks the connection thread for a new one in the background.
    fn disk_bytes(&self) -> Option<u64> {
        let mut size = self.size.lock();
        let known = size.map(|(_, bytes)| bytes);
        if size.is_none_or(|(at, _)| at.elapsed() >= Duration::from_secs(1)) {
            // Marked fresh now, so one refresh is asked for at a time.
            *size = Some((Instant::now(), known.unwrap_or(0)));
            drop(size);
            let cache = self.size.clone();
            let refresh: Call = Box::new(move |c| {
                let Ok((runtime, client)) = c.parts() else { return };
                let read = runtime.block_on(client.query_one("SELECT pg_database_size(current_database())", &[]));
                if let Ok(row) = read {
                    *cache.lock() = Some((Instant::now(), u64_of(row.get(0))));
                }
            });
            let _ = self.calls.lock().try_send(refresh);
        }
        known
    }

    fn rows_scan(&self, from: &[u8], to: &[u8]) -> Result<Vec<crate::store::durable::engine::StoredRow>, StoreError> {
        Ok(self
            .query(
                "SELECT key, seen_at, body FROM mailbox_index WHERE key >= $1 AND key < $2 ORDER BY key",
                vec![Box::new(from.to_vec()), Box::new(to.to_vec())],
            )?
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    fn row_get(&self, key: &[u8]) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        Ok(self
            .query(
                "SELECT seen_at, body FROM mailbox_index WHERE key = $1",
                vec![Box::new(key.to_vec())],
            )?
            .first()
            .map(|r| (r.get(0), r.get(1))))
    }

    fn row_groups(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .query(
                "SELECT DISTINCT user_name FROM mailbox_index ORDER BY user_name",
                vec![],
            )?
            .into_iter()
            .map(|r| r.get(0))
            .collect())
    }

    fn rows_before(&self, before: i64) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self
            .query(
                "SELECT key FROM mailbox_index WHERE seen_at < $1",
                vec![Box::new(before)],
            )?
            .into_iter()
            .map(|r| r.get(0))
            .collect())
    }

    fn audit_size(&self) -> Result<u64, StoreError> {
        let rows = self.query("SELECT size FROM audit_head WHERE id = 1", vec![])?;
        Ok(rows.first().map_or(0, |r| u64_of(r.get(0))))
    }

    fn audit_hashes(&self, indexes: &[u64]) -> Result<Vec<Option<[u8; 32]>>, StoreError> {
        let wanted: Vec<i64> = indexes.iter().map(|i| clamp(*i)).collect();
        let found: std::collections::HashMap<u64, [u8; 32]> = self
            .query(
                "SELECT idx, hash FROM audit_hashes WHERE idx = ANY($1)",
                vec![Box::new(wanted)],
            )?
            .into_iter()
            .filter_map(|r| {
                let hash: Vec<u8> = r.get(1);
                Some((u64_of(r.get(0)), <[u8; 32]>::try_from(hash.as_slice()).ok()?))
            })
            .collect();
        Ok(indexes.iter().map(|i| found.get(i).copied()).collect())
    }

    fn audit_records(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .query(
                "SELECT idx, body FROM audit_records WHERE idx >= $1 AND idx < $2 ORDER BY idx",
                vec![Box::new(clamp(from)), Box::new(clamp(to))],
            )?
            .into_iter()
            .map(|r| (u64_of(r.get(0)), r.get(1)))
            .collect())
    }

    fn audit_checkpoint(&self, size: Option<u64>) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let rows = match size {
            Some(size) => self.query(
                "SELECT size, note FROM audit_checkpoints WHERE size = $1",
                vec![Box::new(clamp(size))],
            )?,
            None => self.query(
                "SELECT size, note FROM audit_checkpoints ORDER BY size DESC LIMIT 1",
                vec![],
            )?,
        };
        Ok(rows.first().map(|r| (u64_of(r.get(0)), r.get(1))))
    }

    fn audit_accepted(&self, ids: &[String]) -> Result<Vec<Option<u64>>, StoreError> {
        let found: std::collections::HashMap<String, u64> = self
            .query(
                // One probe per id (a nested loop over the ids), whatever the planner's
                // statistics say of a table that grows fast. An event stored before the log
                // existed has no acceptance.
                "SELECT u.id, a.idx FROM unnest($1::text[]) AS u(id) JOIN audit_accepted a ON a.event_id = u.id",
                vec![Box::new(ids.to_vec())],
            )?
            .into_iter()
            .map(|r| (r.get(0), u64_of(r.get(1))))
            .collect();
        Ok(ids.iter().map(|id| found.get(id).copied()).collect())
    }

    fn audit_leaves_of(&self, event_id: &str) -> Result<Vec<u64>, StoreError> {
        Ok(self
            .query(
                "SELECT idx FROM audit_records WHERE event_id = $1 ORDER BY idx",
                vec![Box::new(event_id.to_string())],
            )?
            .into_iter()
            .map(|r| u64_of(r.get(0)))
            .collect())
    }
}

impl crate::store::durable::engine::PagedEngine for Postgres {
    fn queue_page(
        &self,
        subscription: &str,
        ordered: bool,
        after: Option<(u64, u64)>,
        limit: usize,
    ) -> Result<Vec<crate::store::durable::engine::QueueRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (due, seq) = after.map_or((-1, -1), |(d, s)| (clamp(d), clamp(s)));
        let rows = if ordered {
            self.query(
                "SELECT seq, due, body FROM queue WHERE subscription = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                vec![Box::new(subscription.to_string()), Box::new(seq), Box::new(limit)],
            )?
        } else {
            self.query(
                "SELECT seq, due, body FROM queue WHERE subscription = $1 AND (due, seq) > ($2, $3) \
                 ORDER BY due, seq LIMIT $4",
                vec![
                    Box::new(subscription.to_string()),
                    Box::new(due),
                    Box::new(seq),
                    Box::new(limit),
                ],
            )?
        };
        Ok(rows
            .into_iter()
            .map(|r| {
                let seq = u64_of(r.get(0));
                let key = if ordered { (0, seq) } else { (u64_of(r.get(1)), seq) };
                (key, r.get(2))
            })
            .collect())
    }

    fn dead_range(
        &self,
        subscription: &str,
        from: u64,
        to: u64,
        newest_first: bool,
        limit: usize,
    ) -> Result<Vec<(u64, u64, Vec<u8>)>, StoreError> {
        let params: Params = vec![
            Box::new(subscription.to_string()),
            Box::new(clamp(from)),
            Box::new(clamp(to)),
            Box::new(i64::try_from(limit).unwrap_or(i64::MAX)),
        ];
        let rows = if newest_first {
            self.query(
                "SELECT dead_at, seq, body FROM dead_queue WHERE subscription = $1 AND dead_at >= $2 AND dead_at < $3 \
                 ORDER BY dead_at DESC, seq DESC LIMIT $4",
                params,
            )?
        } else {
            self.query(
                "SELECT dead_at, seq, body FROM dead_queue WHERE subscription = $1 AND dead_at >= $2 AND dead_at < $3 \
                 ORDER BY dead_at, seq LIMIT $4",
                params,
            )?
        };
        Ok(rows
            .into_iter()
            .map(|r| (u64_of(r.get(0)), u64_of(r.get(1)), r.get(2)))
            .collect())
    }

    fn producers(&self, ids: &[&str]) -> Result<Vec<(String, String)>, StoreError> {
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let ids: Vec<String> = ids.iter().map(|s| (*s).to_string()).collect();
        Ok(self
            .query(
                "SELECT producer_id, event_id FROM producers WHERE producer_id = ANY($1)",
                vec![Box::new(ids)],
            )?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    fn producers_before(&self, before: i64, limit: usize) -> Result<Vec<(i64, String)>, StoreError> {
        Ok(self
            .query(
                "SELECT seen_at, producer_id FROM producers WHERE seen_at < $1 ORDER BY seen_at LIMIT $2",
                vec![Box::new(before), Box::new(i64::try_from(limit).unwrap_or(i64::MAX))],
            )?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    fn queue_stats(&self) -> Result<Vec<(String, crate::store::durable::engine::QueueFigures)>, StoreError> {
        Ok(self
            .query("SELECT uid, queued, bytes, dead FROM queue_stats", vec![])?
            .into_iter()
            .map(|r| (r.get(0), (u64_of(r.get(1)), u64_of(r.get(2)), u64_of(r.get(3)))))
            .collect())
    }

    fn next_seq(&self) -> Result<u64, StoreError> {
        Ok(self
            .query("SELECT value FROM store_counters WHERE name = 'next_seq'", vec![])?
            .first()
            .map_or(0, |r| u64_of(r.get(0))))
    }

    fn attempt_subscriptions(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .query("SELECT DISTINCT subscription FROM attempts", vec![])?
            .into_iter()
            .map(|r| r.get(0))
            .collect())
    }

    fn namespaces(&self) -> Result<Vec<(String, String)>, StoreError> {
        Ok(self
            .query("SELECT uid, namespace FROM subscriptions", vec![])?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    fn migrate_legacy(&self) -> Result<u64, StoreError> {
        self.call(|c| {
            let (runtime, client) = c.parts()?;
            runtime.block_on(async {
                let txn = client.transaction().await.map_err(unavailable)?;
                let moved = super::shared::to_paged(&txn).await.map_err(unavailable)?;
                txn.commit().await.map_err(unavailable)?;
                Ok(moved)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(bytes: &str) -> crate::audit::Leaf {
        crate::audit::Leaf {
            bytes: bytes.as_bytes().to_vec(),
            event_id: None,
            accepted_at_index: None,
            assigned: Some(crate::event::LogIndex::default()),
        }
    }

    #[test]
    fn leaves_that_landed_are_skipped_until_a_commit_carrying_them_is_done() {
        let mut landed = Landed::default();
        landed.add(&Unsure {
            first: 40,
            leaves: vec![b"a".to_vec(), b"b".to_vec()],
        });
        // The retry carries "b" and a new leaf: "b" is not appended again, and learns its index.
        let mut leaves = vec![leaf("b"), leaf("c")];
        let skipped = landed.skip(&mut leaves);
        assert_eq!(leaves.len(), 1);
        assert_eq!(leaves[0].bytes, b"c");
        assert_eq!(skipped, vec![b"b".to_vec()]);
        // That commit failed: the next retry still skips "b".
        let retried = leaf("b");
        let slot = retried.assigned.as_ref().map(crate::event::LogIndex::share);
        let mut leaves = vec![retried];
        let skipped = landed.skip(&mut leaves);
        assert!(leaves.is_empty());
        assert_eq!(slot.and_then(|s| s.get()), Some(41));
        // Once a commit carrying it is done, it is forgotten; "a" is kept.
        landed.forget(&skipped);
        assert_eq!(landed.leaves.len(), 1);
        assert!(landed.leaves.contains_key(b"a".as_slice()));
    }
}
