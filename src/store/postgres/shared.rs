//! Shared mode on PostgreSQL: the ingest that de-duplicates and numbers in the database,
//! the fenced writes, the claims, and the session that holds this replica's shard locks.
//!
//! Ownership of a shard is a session advisory lock (released by the server the moment the
//! holder's connection dies, so a killed replica's shards are free at once); each taking of
//! a shard draws a new epoch, written to `shard_owners` and to every row the owner claims.
//! A write made under an older epoch matches no row: the new owner's work stands.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::engine::{DeliveryKeys, Params, Postgres, signed, u64_of};
use crate::store::durable::Op;
use crate::store::durable::shared::{Claimed, Fenced, IngestBatch, SharedEngine};
use crate::store::{Appended, PublishedHealth, StoreError};

/// Advisory lock classes (two-int keys, `objsubid = 2` in `pg_locks`); the first word is
/// "mh" and the kind.
const SHARD_LOCKS: i32 = 0x6d68_0001;
/// Held in share mode by every live replica: their number is the fair share's divisor.
const MEMBER_LOCK: i32 = 0x6d68_0002;
/// Live members of this database's replicas (advisory locks are per database).
const MEMBERS: &str = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     AND classid = $1::int4::oid AND objid = 0 AND objsubid = 2 AND granted";
/// Shared mode holds it shared, a single-owner store exclusively: the two never mix.
pub const MODE_LOCK: (i32, i32) = (0x6d68_0003, 0);

/// The delivery writes of one group commit. Writes to one delivery keep their order: the
/// k-th write of each delivery goes in round k, and the rounds run in turn (within one,
/// every delivery appears once, so its statements may run in any order).
#[derive(Default)]
pub(super) struct SharedWrites {
    rounds: Vec<Round>,
    /// Writes seen per seq in this commit: the round of the next one.
    seen: HashMap<i64, usize>,
    pub(super) unused_events: Vec<String>,
    pub(super) forgotten: Vec<String>,
    /// Rows the fenced deletes and updates should match (fewer did: refused).
    pub(super) expected: u64,
}

#[derive(Default)]
struct Round {
    fenced: Vec<(i64, i64, FencedKind)>,
    claimed: Vec<(i64, i64, i32, Vec<u8>)>,
    dropped_dead: Vec<i64>,
}

/// The fenced statements, by which the commit counts what they matched.
pub(super) const FENCED_DELETE: &str = "DELETE FROM pending p USING unnest($1::bigint[], $2::bigint[]) AS x(seq, epoch) \
     WHERE p.seq = x.seq AND p.claim = x.epoch";
/// A fenced delete of completed deliveries that also counts them, in the same commit.
pub(super) const FENCED_COMPLETE: &str = "WITH done AS (\
       DELETE FROM pending p USING unnest($1::bigint[], $2::bigint[]) AS x(seq, epoch) \
       WHERE p.seq = x.seq AND p.claim = x.epoch RETURNING p.subscription), \
     counted AS (INSERT INTO subscription_counters (uid, delivered) \
       SELECT subscription, count(*) FROM done WHERE subscription IS NOT NULL GROUP BY subscription \
       ON CONFLICT (uid) DO UPDATE SET delivered = subscription_counters.delivered + excluded.delivered) \
     SELECT count(*) FROM done";
pub(super) const FENCED_UPDATE: &str = "UPDATE pending p SET body = x.body \
     FROM unnest($1::bigint[], $2::bigint[], $3::bytea[]) AS x(seq, epoch, body) \
     WHERE p.seq = x.seq AND p.claim = x.epoch";

enum FencedKind {
    Delete,
    Update(Vec<u8>),
    Bury(Vec<u8>),
}

impl SharedWrites {
    fn round(&mut self, seq: i64) -> &mut Round {
        let n = self.seen.entry(seq).or_insert(0);
        let at = *n;
        *n += 1;
        if self.rounds.len() <= at {
            self.rounds.resize_with(at + 1, Round::default);
        }
        &mut self.rounds[at]
    }

    pub(super) fn fenced(&mut self, seq: i64, epoch: i64, write: &Fenced) {
        let kind = match write {
            Fenced::Delete => FencedKind::Delete,
            Fenced::Update(b) => FencedKind::Update(b.clone()),
            Fenced::Bury(b) => FencedKind::Bury(b.clone()),
        };
        self.round(seq).fenced.push((seq, epoch, kind));
    }

    pub(super) fn claimed(&mut self, seq: i64, epoch: i64, shard: i32, body: Vec<u8>) {
        self.round(seq).claimed.push((seq, epoch, shard, body));
    }

    pub(super) fn drop_dead(&mut self, seq: i64) {
        self.round(seq).dropped_dead.push(seq);
    }

    /// After the single-owner statements: the rounds in turn, then what is deleted by
    /// subscription, and event deletes last, once their deliveries are gone.
    pub(super) fn statements(&mut self, out: &mut Vec<(&'static str, Params)>) {
        for round in std::mem::take(&mut self.rounds) {
            self.expected += round.statements(out);
        }
        let forgotten = std::mem::take(&mut self.forgotten);
        if !forgotten.is_empty() {
            out.push((
                "DELETE FROM pending WHERE subscription = ANY($1)",
                vec![Box::new(forgotten.clone())],
            ));
            out.push((
                "DELETE FROM dead_letters WHERE subscription = ANY($1)",
                vec![Box::new(forgotten.clone())],
            ));
            out.push((
                "DELETE FROM subscription_health WHERE uid = ANY($1)",
                vec![Box::new(forgotten.clone())],
            ));
            out.push((
                "DELETE FROM subscription_counters WHERE uid = ANY($1)",
                vec![Box::new(forgotten)],
            ));
        }
        let unused = std::mem::take(&mut self.unused_events);
        if !unused.is_empty() {
            out.push((UNUSED_EVENTS, vec![Box::new(unused)]));
        }
    }
}

impl Round {
    /// This round's statements; returns the rows its fenced deletes and updates should match.
    fn statements(self, out: &mut Vec<(&'static str, Params)>) -> u64 {
        let (mut bury, mut delete, mut done, mut update) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut fenced = self.fenced;
        // Rows locked in seq order by every writer: two replicas never wait in a cycle.
        fenced.sort_unstable_by_key(|f| f.0);
        for (seq, epoch, kind) in fenced {
            match kind {
                FencedKind::Delete => done.push((seq, epoch)),
                FencedKind::Update(b) => update.push((seq, epoch, b)),
                FencedKind::Bury(b) => {
                    delete.push((seq, epoch));
                    bury.push((seq, epoch, b));
                }
            }
        }
        let triple = |rows: Vec<(i64, i64, Vec<u8>)>| -> Params {
            let (mut s, mut e, mut b) = (Vec::new(), Vec::new(), Vec::new());
            for (seq, epoch, body) in rows {
                s.push(seq);
                e.push(epoch);
                b.push(body);
            }
            vec![Box::new(s), Box::new(e), Box::new(b)]
        };
        // The dead letter first, from the row its delete then removes (both on the claim).
        if !bury.is_empty() {
            out.push((
                "INSERT INTO dead_letters (seq, body, subscription, event_id, shard) \
                 SELECT p.seq, x.body, p.subscription, p.event_id, p.shard \
                 FROM unnest($1::bigint[], $2::bigint[], $3::bytea[]) AS x(seq, epoch, body) \
                 JOIN pending p ON p.seq = x.seq AND p.claim = x.epoch \
                 ON CONFLICT (seq) DO UPDATE SET body = excluded.body",
                triple(bury),
            ));
        }
        let expected = (delete.len() + done.len() + update.len()) as u64;
        if !done.is_empty() {
            let (s, e): (Vec<i64>, Vec<i64>) = done.into_iter().unzip();
            out.push((FENCED_COMPLETE, vec![Box::new(s), Box::new(e)]));
        }
        if !delete.is_empty() {
            let (s, e): (Vec<i64>, Vec<i64>) = delete.into_iter().unzip();
            out.push((FENCED_DELETE, vec![Box::new(s), Box::new(e)]));
        }
        if !update.is_empty() {
            out.push((FENCED_UPDATE, triple(update)));
        }
        if !self.dropped_dead.is_empty() {
            out.push((
                "DELETE FROM dead_letters WHERE seq = ANY($1)",
                vec![Box::new(self.dropped_dead)],
            ));
        }
        if !self.claimed.is_empty() {
            let (mut s, mut e, mut h, mut b, mut subs, mut events) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (seq, epoch, shard, body) in self.claimed {
                let keys = DeliveryKeys::of(&body);
                s.push(seq);
                e.push(epoch);
                h.push(shard);
                subs.push(keys.subscription);
                events.push(keys.event_id);
                b.push(body);
            }
            // Under a claim that is no longer current it waits unclaimed: the shard's new
            // owner picks it up as it does new deliveries.
            out.push((
                "INSERT INTO pending (seq, claim, shard, body, subscription, event_id) \
                 SELECT x.seq, CASE WHEN EXISTS (SELECT 1 FROM shard_owners o WHERE o.shard = x.shard AND o.epoch = x.claim) \
                   THEN x.claim END, x.shard, x.body, x.subscription, x.event_id \
                 FROM unnest($1::bigint[], $2::bigint[], $3::int4[], $4::bytea[], $5::text[], $6::text[]) \
                   AS x(seq, claim, shard, body, subscription, event_id) \
                 ON CONFLICT (seq) DO UPDATE SET body = excluded.body, claim = excluded.claim",
                vec![Box::new(s), Box::new(e), Box::new(h), Box::new(b), Box::new(subs), Box::new(events)],
            ));
        }
        expected
    }
}

const UNUSED_EVENTS: &str = "DELETE FROM events e WHERE e.id = ANY($1) \
     AND NOT EXISTS (SELECT 1 FROM pending p WHERE p.event_id = e.id AND p.shard IS NOT NULL) \
     AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = e.id AND d.shard IS NOT NULL)";

/// The shared ingests of a group commit (owned: they cross to the connection thread).
pub(super) fn ingests(ops: &[&Op]) -> Vec<IngestBatch> {
    ops.iter()
        .filter_map(|op| match op {
            Op::Ingest(batch) => Some(batch.as_ref().clone()),
            _ => None,
        })
        .collect()
}

/// Runs the shared ingests of a commit inside its transaction; the outcome of each.
///
/// A producer id is claimed by inserting it (`ON CONFLICT DO NOTHING`): a concurrent
/// insert of the same id by another replica makes this one wait for that commit, then
/// count as a duplicate. Ids are inserted in sorted order, so two replicas never wait on
/// each other in a cycle.
pub(super) async fn ingest(
    txn: &tokio_postgres::Transaction<'_>,
    batches: &[IngestBatch],
    audit: &mut Vec<crate::audit::Leaf>,
) -> Result<Vec<Vec<Appended>>, tokio_postgres::Error> {
    if batches.is_empty() {
        return Ok(vec![]);
    }
    // The first event of a producer id in this commit is the one that may be new.
    let mut first: HashMap<&str, (usize, usize)> = HashMap::new();
    for (b, batch) in batches.iter().enumerate() {
        for (i, item) in batch.items.iter().enumerate() {
            if let Some(p) = &item.producer {
                first.entry(p.as_str()).or_insert((b, i));
            }
        }
    }
    let mut inserted: HashSet<String> = HashSet::new();
    let mut existing: HashMap<String, String> = HashMap::new();
    if !first.is_empty() {
        let mut claims: Vec<(&str, &str, i64)> = first
            .iter()
            .map(|(p, (b, i))| (*p, batches[*b].items[*i].event_id.as_str(), batches[*b].seen_at))
            .collect();
        claims.sort_unstable();
        let ids: Vec<&str> = claims.iter().map(|c| c.0).collect();
        let events: Vec<&str> = claims.iter().map(|c| c.1).collect();
        let at: Vec<i64> = claims.iter().map(|c| c.2).collect();
        for row in txn
            .query(
                "INSERT INTO producers (producer_id, event_id, seen_at) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) ORDER BY 1 \
                 ON CONFLICT (producer_id) DO NOTHING RETURNING producer_id",
                &[&ids, &events, &at],
            )
            .await?
        {
            inserted.insert(row.get(0));
        }
        let seen: Vec<&str> = ids.iter().copied().filter(|p| !inserted.contains(*p)).collect();
        if !seen.is_empty() {
            for row in txn
                .query(
                    "SELECT producer_id, event_id FROM producers WHERE producer_id = ANY($1)",
                    &[&seen],
                )
                .await?
            {
                existing.insert(row.get(0), row.get(1));
            }
        }
    }
    let mut outcomes = Vec::with_capacity(batches.len());
    let (mut event_ids, mut event_bodies) = (Vec::new(), Vec::new());
    let (mut bodies, mut subscriptions, mut events, mut shards) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut raws = Vec::new();
    for (b, batch) in batches.iter().enumerate() {
        let mut out = Vec::with_capacity(batch.items.len());
        for (i, item) in batch.items.iter().enumerate() {
            if let Some(p) = &item.producer {
                let new = first.get(p.as_str()) == Some(&(b, i)) && inserted.contains(p);
                if !new {
                    let id = existing
                        .get(p)
                        .cloned()
                        .or_else(|| {
                            first
                                .get(p.as_str())
                                .map(|(fb, fi)| batches[*fb].items[*fi].event_id.clone())
                        })
                        .unwrap_or_else(|| item.event_id.clone());
                    out.push(Appended { id, duplicate: true });
                    continue;
                }
            }
            // Only an event new to the store is logged as accepted.
            if let Some(leaf) = &item.audit {
                audit.push(leaf.clone());
            }
            if let Some(body) = &item.event {
                event_ids.push(item.event_id.as_str());
                event_bodies.push(body.as_slice());
                for (subscription, shard, delivery) in &item.deliveries {
                    bodies.push(delivery.as_slice());
                    subscriptions.push(subscription.as_str());
                    events.push(item.event_id.as_str());
                    shards.push(*shard);
                }
            }
            out.push(Appended {
                id: item.event_id.clone(),
                duplicate: false,
            });
        }
        // The batch carries a raw message only when an event of it refers to it, and its
        // mailbox index rows come with it: archived (again) even when every event was a
        // duplicate, so that the index never names a message that is not there.
        if let Some(raw) = &batch.raw {
            raws.push(raw);
        }
        outcomes.push(out);
    }
    if !event_ids.is_empty() {
        txn.execute(
            "INSERT INTO events (id, body) SELECT * FROM unnest($1::text[], $2::bytea[]) \
             ON CONFLICT (id) DO UPDATE SET body = excluded.body",
            &[&event_ids, &event_bodies],
        )
        .await?;
    }
    if !bodies.is_empty() {
        // One seq per delivery from the shared sequence, in the order enqueued.
        txn.execute(
            "INSERT INTO pending (seq, body, subscription, event_id, shard) \
             SELECT nextval('delivery_seq'), x.body, x.subscription, x.event_id, x.shard \
             FROM unnest($1::bytea[], $2::text[], $3::text[], $4::int4[]) AS x(body, subscription, event_id, shard)",
            &[&bodies, &subscriptions, &events, &shards],
        )
        .await?;
    }
    for (sha256, at, bytes) in raws {
        txn.execute(
            "INSERT INTO raw_messages (sha256, archived_at, message) VALUES ($1, $2, $3) \
             ON CONFLICT (sha256) DO UPDATE SET archived_at = excluded.archived_at",
            &[sha256, at, bytes],
        )
        .await?;
    }
    Ok(outcomes)
}

fn rows_of(rows: Vec<tokio_postgres::Row>) -> Vec<(u64, Vec<u8>)> {
    rows.into_iter().map(|r| (u64_of(r.get(0)), r.get(1))).collect()
}

impl SharedEngine for Postgres {
    fn claim_shard(&self, shard: u32, epoch: u64) -> Result<Claimed, StoreError> {
        let shard = i32::try_from(shard).map_err(|_| StoreError::Failed(format!("shard {shard} out of range")))?;
        let epoch = signed(epoch)?;
        // Only under the shard's current epoch (a replica whose session died while it was
        // taking the shard must not overwrite the claims of the one that took it since),
        // and row locks taken in seq order (as every writer does: no deadlock between them).
        let current = self.query(
            "SELECT 1 FROM shard_owners WHERE shard = $1 AND epoch = $2",
            vec![Box::new(shard), Box::new(epoch)],
        )?;
        if current.is_empty() {
            return Err(StoreError::Unavailable(format!(
                "shard {shard} is no longer this replica's (epoch {epoch} is not current)"
            )));
        }
        let pending = self.query(
            "UPDATE pending SET claim = $2 WHERE seq IN (\
               SELECT seq FROM pending WHERE shard = $1 AND shard IS NOT NULL ORDER BY seq FOR UPDATE) \
             AND EXISTS (SELECT 1 FROM shard_owners WHERE shard = $1 AND epoch = $2) \
             RETURNING seq, body",
            vec![Box::new(shard), Box::new(epoch)],
        )?;
        let dead = self.query(
            "SELECT seq, body FROM dead_letters WHERE shard = $1",
            vec![Box::new(shard)],
        )?;
        Ok(Claimed {
            pending: rows_of(pending),
            dead: rows_of(dead),
        })
    }

    fn claim_arrivals(&self, owned: &[(u32, u64)]) -> Result<Vec<(u64, u64, Vec<u8>)>, StoreError> {
        let mut shards = Vec::with_capacity(owned.len());
        let mut epochs = Vec::with_capacity(owned.len());
        for (s, e) in owned {
            shards.push(i32::try_from(*s).map_err(|_| StoreError::Failed(format!("shard {s} out of range")))?);
            epochs.push(signed(*e)?);
        }
        // Only under the shard's current epoch: a replica that lost a shard claims nothing
        // more of it, even before it knows.
        let rows = self.query(
            "UPDATE pending p SET claim = o.epoch \
             FROM unnest($1::int4[], $2::bigint[]) AS o(shard, epoch) \
             JOIN shard_owners so ON so.shard = o.shard AND so.epoch = o.epoch \
             WHERE p.shard = o.shard AND p.shard IS NOT NULL AND p.claim IS NULL \
             RETURNING p.seq, p.claim, p.body",
            vec![Box::new(shards), Box::new(epochs)],
        )?;
        let mut out: Vec<(u64, u64, Vec<u8>)> = rows
            .into_iter()
            .map(|r| (u64_of(r.get(0)), u64_of(r.get(1)), r.get(2)))
            .collect();
        out.sort_unstable_by_key(|r| r.0);
        Ok(out)
    }

    fn events(&self, ids: &[String]) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        crate::store::durable::engine::Engine::events_by_id(self, ids)
    }

    fn attempt_counts(&self) -> Result<Vec<(String, u64, u64)>, StoreError> {
        Ok(self
            .query(
                "SELECT subscription, count(*), max(at_nanos) FROM attempts GROUP BY subscription",
                vec![],
            )?
            .into_iter()
            .map(|r| (r.get(0), u64_of(r.get(1)), u64_of(r.get(2))))
            .collect())
    }

    fn purge_producers(&self, before: i64) -> Result<u64, StoreError> {
        let rows = self.query(
            "WITH gone AS (DELETE FROM producers WHERE seen_at < $1 RETURNING 1) SELECT count(*) FROM gone",
            vec![Box::new(before)],
        )?;
        Ok(rows.first().map_or(0, |r| u64_of(r.get(0))))
    }

    fn collect_events(&self) -> Result<u64, StoreError> {
        // In slices, so one pass never holds locks on a large part of the table.
        let rows = self.query(
            "WITH gone AS (DELETE FROM events e WHERE e.id IN (\
               SELECT v.id FROM events v \
               WHERE NOT EXISTS (SELECT 1 FROM pending p WHERE p.event_id = v.id AND p.shard IS NOT NULL) \
                 AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = v.id AND d.shard IS NOT NULL) \
               LIMIT 10000) RETURNING 1) SELECT count(*) FROM gone",
            vec![],
        )?;
        Ok(rows.first().map_or(0, |r| u64_of(r.get(0))))
    }

    fn subscriptions(&self) -> Result<Vec<(String, Option<String>)>, StoreError> {
        Ok(self
            .query(
                "SELECT a.uid, s.namespace FROM (\
                   SELECT DISTINCT subscription AS uid FROM pending \
                   UNION SELECT DISTINCT subscription FROM dead_letters \
                   UNION SELECT DISTINCT subscription FROM attempts \
                   UNION SELECT uid FROM subscriptions) a \
                 LEFT JOIN subscriptions s ON s.uid = a.uid WHERE a.uid IS NOT NULL ORDER BY a.uid",
                vec![],
            )?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    fn publish_health(&self, owner: &str, rows: Vec<(String, String)>) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let (uids, bodies): (Vec<String>, Vec<String>) = rows.into_iter().unzip();
        self.query(
            "INSERT INTO subscription_health (uid, owner, body, updated_at) \
             SELECT x.uid, $1, x.body::jsonb, now() FROM unnest($2::text[], $3::text[]) AS x(uid, body) \
             ON CONFLICT (uid) DO UPDATE SET owner = excluded.owner, body = excluded.body, updated_at = now()",
            vec![Box::new(owner.to_string()), Box::new(uids), Box::new(bodies)],
        )?;
        Ok(())
    }

    fn published_health(&self) -> Result<Vec<PublishedHealth>, StoreError> {
        let mut out = Vec::new();
        // `delivered` is the durable count, not the owner's (which a crash loses).
        for r in self.query(
            "SELECT h.uid, h.owner, h.body::text, c.delivered FROM subscription_health h \
             LEFT JOIN subscription_counters c ON c.uid = h.uid",
            vec![],
        )? {
            let body: String = r.get(2);
            let Ok(mut body) = serde_json::from_str::<serde_json::Value>(&body) else {
                continue;
            };
            if let (Some(n), Some(fields)) = (r.get::<_, Option<i64>>(3), body.as_object_mut()) {
                fields.insert("delivered".into(), serde_json::Value::from(n));
            }
            out.push(PublishedHealth {
                uid: r.get(0),
                owner: r.get(1),
                body,
            });
        }
        Ok(out)
    }

    fn forget_health(&self, uids: &[String]) -> Result<(), StoreError> {
        if uids.is_empty() {
            return Ok(());
        }
        self.query(
            "DELETE FROM subscription_health WHERE uid = ANY($1)",
            vec![Box::new(uids.to_vec())],
        )?;
        Ok(())
    }

    fn dead_letters_of(&self, shard: u32, subscription: &str) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let shard = i32::try_from(shard).map_err(|_| StoreError::Failed(format!("shard {shard} out of range")))?;
        Ok(rows_of(self.query(
            "SELECT seq, body FROM dead_letters WHERE shard = $1 AND shard IS NOT NULL AND subscription = $2",
            vec![Box::new(shard), Box::new(subscription.to_string())],
        )?))
    }

    fn pending_count(&self) -> Result<u64, StoreError> {
        let rows = self.query("SELECT count(*) FROM pending", vec![])?;
        Ok(rows.first().map_or(0, |r| u64_of(r.get(0))))
    }

    fn fenced_writes(&self) -> u64 {
        self.fenced.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Readies a database for shared mode at start, under the migration lock: rows written by
/// a single-owner operator get their shard, and a changed shard count re-shards every row —
/// refused while other replicas run (they would each own a different split).
///
/// `joined`: the caller's own session is a member already (it is not counted as another).
pub async fn prepare(client: &mut tokio_postgres::Client, shards: usize, joined: bool) -> Result<(), SharedError> {
    let txn = client.transaction().await?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&super::migrations::LOCK_KEY])
        .await?;
    let recorded: Option<String> = txn
        .query_opt(
            "SELECT convert_from(value, 'UTF8') FROM meta WHERE name = 'shards'",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    let mine = shards.to_string();
    let reshard = recorded.as_deref().is_some_and(|r| r != mine);
    if reshard {
        let members: i64 = txn.query_one(MEMBERS, &[&MEMBER_LOCK]).await?.get(0);
        if members > i64::from(joined) {
            return Err(SharedError::ShardCount {
                recorded: recorded.unwrap_or_default(),
                mine,
            });
        }
    }
    // What a single-owner operator queued in the paged tables comes back to the shared ones.
    to_shared(&txn).await?;
    for table in ["pending", "dead_letters"] {
        // Rows an older single-owner operator wrote without their columns.
        let fill = format!(
            "UPDATE {table} SET subscription = convert_from(body, 'UTF8')::jsonb ->> 'subscription', \
               event_id = convert_from(body, 'UTF8')::jsonb ->> 'eventId' WHERE subscription IS NULL"
        );
        txn.execute(fill.as_str(), &[]).await?;
        let select = if reshard {
            format!("SELECT seq, subscription FROM {table}")
        } else {
            format!("SELECT seq, subscription FROM {table} WHERE shard IS NULL")
        };
        let rows = txn.query(select.as_str(), &[]).await?;
        if rows.is_empty() {
            continue;
        }
        let mut seqs: Vec<i64> = Vec::with_capacity(rows.len());
        let mut to: Vec<i32> = Vec::with_capacity(rows.len());
        for r in rows {
            seqs.push(r.get(0));
            let subscription: Option<String> = r.get(1);
            let shard = crate::store::shard_of(subscription.as_deref().unwrap_or_default(), shards);
            to.push(i32::try_from(shard).unwrap_or(0));
        }
        let update = format!(
            "UPDATE {table} t SET shard = x.shard FROM unnest($1::bigint[], $2::int4[]) AS x(seq, shard) WHERE t.seq = x.seq"
        );
        txn.execute(update.as_str(), &[&seqs, &to]).await?;
    }
    // A single-owner operator numbered deliveries itself: the sequence starts past them.
    txn.execute(
        "SELECT setval('delivery_seq', GREATEST((SELECT last_value FROM delivery_seq), \
           (SELECT COALESCE(max(seq), 0) FROM pending), (SELECT COALESCE(max(seq), 0) FROM dead_letters)))",
        &[],
    )
    .await?;
    txn.execute(
        "INSERT INTO meta (name, value) VALUES ('shards', convert_to($1, 'UTF8')) \
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        &[&mine],
    )
    .await?;
    txn.commit().await?;
    Ok(())
}

/// Moves the shared layout's rows (`pending`, `dead_letters`) into the paged one (`queue`,
/// `dead_queue`, event references, figures) for a database one operator owns; returns the
/// rows moved. Run at that operator's start, in `txn`.
pub(super) async fn to_paged(txn: &tokio_postgres::Transaction<'_>) -> Result<u64, tokio_postgres::Error> {
    let json = "convert_from(body, 'UTF8')::jsonb";
    let moved_queue = txn
        .execute(
            &format!(
                "INSERT INTO queue (subscription, seq, due, event_id, body) \
                 SELECT {json} ->> 'subscription', seq, \
                   (LEAST(GREATEST(extract(epoch FROM ({json} ->> 'notBefore')::timestamptz), 0), 9e9) * 1000000000)::bigint, \
                   {json} ->> 'eventId', body FROM pending \
                 ON CONFLICT (subscription, seq) DO NOTHING"
            ),
            &[],
        )
        .await?;
    let moved_dead = txn
        .execute(
            &format!(
                "INSERT INTO dead_queue (subscription, seq, dead_at, event_id, body) \
                 SELECT {json} ->> 'subscription', seq, \
                   (LEAST(GREATEST(extract(epoch FROM COALESCE({json} ->> 'deadAt', {json} ->> 'notBefore')::timestamptz), 0), 9e9) * 1000000000)::bigint, \
                   {json} ->> 'eventId', body FROM dead_letters \
                 ON CONFLICT (subscription, seq) DO NOTHING"
            ),
            &[],
        )
        .await?;
    if moved_queue + moved_dead == 0 {
        return Ok(0);
    }
    txn.batch_execute(
        "UPDATE events e SET refs = c.n FROM ( \
           SELECT event_id, count(*)::int AS n FROM ( \
             SELECT event_id FROM queue UNION ALL SELECT event_id FROM dead_queue) r GROUP BY event_id) c \
         WHERE e.id = c.event_id; \
         INSERT INTO queue_stats (uid, queued, bytes, dead) \
           SELECT s, sum(q), 0, sum(d) FROM ( \
             SELECT subscription AS s, 1 AS q, 0 AS d FROM queue \
             UNION ALL SELECT subscription, 0, 1 FROM dead_queue) r GROUP BY s \
         ON CONFLICT (uid) DO UPDATE SET queued = excluded.queued, dead = excluded.dead; \
         INSERT INTO store_counters (name, value) SELECT 'next_seq', GREATEST( \
           (SELECT COALESCE(max(seq), 0) FROM queue), (SELECT COALESCE(max(seq), 0) FROM dead_queue)) + 1 \
         ON CONFLICT (name) DO UPDATE SET value = GREATEST(store_counters.value, excluded.value); \
         DELETE FROM pending; DELETE FROM dead_letters;",
    )
    .await?;
    Ok(moved_queue + moved_dead)
}

/// The reverse of `to_paged`, when a database an operator owned alone starts being shared.
async fn to_shared(txn: &tokio_postgres::Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    txn.batch_execute(
        "INSERT INTO pending (seq, body, subscription, event_id) \
           SELECT seq, body, subscription, event_id FROM queue ON CONFLICT (seq) DO NOTHING; \
         INSERT INTO dead_letters (seq, body, subscription, event_id) \
           SELECT seq, body, subscription, event_id FROM dead_queue ON CONFLICT (seq) DO NOTHING; \
         DELETE FROM queue; DELETE FROM dead_queue; DELETE FROM queue_stats; \
         UPDATE events SET refs = 0 WHERE refs <> 0;",
    )
    .await
}

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("PostgreSQL refused a shared-store step")]
    Database(#[from] tokio_postgres::Error),
    #[error(
        "the store's deliveries are split into {recorded} shards and running replicas use that; \
         this one has --shards={mine}. Start every replica with the same --shards (to change it, \
         stop every replica first)"
    )]
    ShardCount { recorded: String, mine: String },
    #[error(
        "another mailhook holds this store as its only owner (started without --shared-store): \
         stop it, or start every replica with --shared-store"
    )]
    ExclusiveElsewhere,
    #[error(
        "another mailhook uses this store (its only owner, or replicas started with --shared-store): \
         one database serves one operator unless every replica runs with --shared-store"
    )]
    InUse,
}

/// The session that holds this replica's locks: membership, and the shards it owns.
pub struct Session {
    client: tokio_postgres::Client,
}

/// A shard as the lock table shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardOwner {
    pub shard: u32,
    pub owner: String,
    pub epoch: u64,
}

impl Session {
    /// Connects (with the server-side keepalives every store connection sets, so a
    /// replica that vanished without closing its connection loses its locks within
    /// seconds, not hours) and joins as a member.
    pub async fn open(database: &super::Database, patience: Duration) -> Result<Session, SharedError> {
        let client = database.connect().await?;
        client.batch_execute("SET application_name = 'mailhook-shards'").await?;
        let shared = patiently(&client, patience, "SELECT pg_try_advisory_lock_shared($1, $2)").await?;
        if !shared {
            return Err(SharedError::ExclusiveElsewhere);
        }
        client
            .execute("SELECT pg_advisory_lock_shared($1, 0)", &[&MEMBER_LOCK])
            .await?;
        Ok(Session { client })
    }

    /// Live replicas (this one included).
    pub async fn members(&self) -> Result<u64, SharedError> {
        let n: i64 = self.client.query_one(MEMBERS, &[&MEMBER_LOCK]).await?.get(0);
        Ok(u64_of(n))
    }

    /// How many shards each live member holds (members holding none included), the
    /// smallest first.
    pub async fn holdings(&self) -> Result<Vec<u64>, SharedError> {
        let rows = self
            .client
            .query(
                "SELECT m.pid, count(s.objid) FROM pg_locks m \
                 LEFT JOIN pg_locks s ON s.pid = m.pid AND s.locktype = 'advisory' AND s.database = m.database \
                   AND s.classid = $2::int4::oid AND s.objsubid = 2 AND s.granted \
                 WHERE m.locktype = 'advisory' AND m.database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND m.classid = $1::int4::oid AND m.objid = 0 \
                   AND m.objsubid = 2 AND m.granted GROUP BY m.pid",
                &[&MEMBER_LOCK, &SHARD_LOCKS],
            )
            .await?;
        let mut counts: Vec<u64> = rows.iter().map(|r| u64_of(r.get(1))).collect();
        counts.sort_unstable();
        Ok(counts)
    }

    /// Shards some live replica holds the lock of.
    pub async fn locked(&self) -> Result<HashSet<u32>, SharedError> {
        let rows = self
            .client
            .query(
                "SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND classid = $1::int4::oid \
                 AND objsubid = 2 AND granted",
                &[&SHARD_LOCKS],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| u32::try_from(r.get::<_, i64>(0)).ok())
            .collect())
    }

    /// Takes `shard` if nobody holds it: its lock, a new epoch, and the owner row naming
    /// `owner`. None when another replica holds it.
    pub async fn take(&self, shard: u32, owner: &str) -> Result<Option<u64>, SharedError> {
        let key = i32::try_from(shard).unwrap_or(i32::MAX);
        let got: bool = self
            .client
            .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&SHARD_LOCKS, &key])
            .await?
            .get(0);
        if !got {
            return Ok(None);
        }
        let epoch: i64 = self
            .client
            .query_one(
                "INSERT INTO shard_owners (shard, owner, epoch, since) VALUES ($1, $2, nextval('claim_epochs'), now()) \
                 ON CONFLICT (shard) DO UPDATE SET owner = excluded.owner, epoch = excluded.epoch, since = now() \
                 RETURNING epoch",
                &[&key, &owner],
            )
            .await?
            .get(0);
        Ok(Some(u64_of(epoch)))
    }

    /// Gives `shard` back: the owner row goes (if still this claim's) and the lock with it.
    pub async fn give_back(&self, shard: u32, epoch: u64) -> Result<(), SharedError> {
        let key = i32::try_from(shard).unwrap_or(i32::MAX);
        let epoch = i64::try_from(epoch).unwrap_or(i64::MAX);
        self.client
            .execute(
                "DELETE FROM shard_owners WHERE shard = $1 AND epoch = $2",
                &[&key, &epoch],
            )
            .await?;
        self.client
            .execute("SELECT pg_advisory_unlock($1, $2)", &[&SHARD_LOCKS, &key])
            .await?;
        Ok(())
    }

    /// Every shard's recorded owner.
    pub async fn owners(&self) -> Result<Vec<ShardOwner>, SharedError> {
        let rows = self
            .client
            .query("SELECT shard, owner, epoch FROM shard_owners ORDER BY shard", &[])
            .await?;
        Ok(rows
            .iter()
            .map(|r| ShardOwner {
                shard: u32::try_from(r.get::<_, i32>(0)).unwrap_or(0),
                owner: r.get(1),
                epoch: u64_of(r.get(2)),
            })
            .collect())
    }

    /// Lets go of every lock at once (shutdown), leaving the owner rows of `owned` behind
    /// for nobody: they are deleted first.
    pub async fn leave(&self, owned: &[(u32, u64)]) -> Result<(), SharedError> {
        for (shard, epoch) in owned {
            let key = i32::try_from(*shard).unwrap_or(i32::MAX);
            let epoch = i64::try_from(*epoch).unwrap_or(i64::MAX);
            self.client
                .execute(
                    "DELETE FROM shard_owners WHERE shard = $1 AND epoch = $2",
                    &[&key, &epoch],
                )
                .await?;
        }
        self.client.execute("SELECT pg_advisory_unlock_all()", &[]).await?;
        Ok(())
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// Single-owner mode on PostgreSQL: held exclusively for as long as `client` lives.
pub async fn hold_exclusive(client: &tokio_postgres::Client, patience: Duration) -> Result<(), SharedError> {
    // The connection's server-side keepalives (set for every store connection) end a
    // vanished owner's session within seconds, so that its successor (a pod rescheduled
    // from a lost node) is not refused for the kernel's default two hours.
    let got = patiently(client, patience, "SELECT pg_try_advisory_lock($1, $2)").await?;
    if got { Ok(()) } else { Err(SharedError::InUse) }
}

/// How long a starting operator waits for the store's mode lock. A process killed with
/// SIGKILL (an OOM kill, a crash) leaves its session on the server until the backend
/// notices: at once when idle, but only after the statement it runs when busy, or after
/// the keepalives when its node vanished. A restart must not fail on its predecessor.
pub const PREDECESSOR_GRACE: Duration = Duration::from_secs(30);

/// Tries `try_lock` (one of the `pg_try_advisory_lock*` calls on the mode lock) until it
/// succeeds or `patience` is spent, saying once who holds the lock.
async fn patiently(client: &tokio_postgres::Client, patience: Duration, try_lock: &str) -> Result<bool, SharedError> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut told = false;
    loop {
        let got: bool = client.query_one(try_lock, &[&MODE_LOCK.0, &MODE_LOCK.1]).await?.get(0);
        if got || tokio::time::Instant::now() >= deadline {
            return Ok(got);
        }
        if !told {
            told = true;
            let holders = mode_holders(client).await;
            tracing::warn!(
                %holders,
                waiting_s = patience.as_secs(),
                "another session holds the store's lock; waiting for it to end (the session of a killed predecessor ends within seconds; a live operator's does not)"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The sessions holding the mode lock, as far as this role may see them.
async fn mode_holders(client: &tokio_postgres::Client) -> String {
    let rows = client
        .query(
            "SELECT l.pid, l.mode, coalesce(a.application_name, ''), coalesce(host(a.client_addr), 'local'), \
               coalesce(a.state, ''), coalesce(extract(epoch FROM now() - a.backend_start)::bigint, 0) \
             FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND l.classid = $1::int4::oid AND l.objid = $2::int4::oid AND l.objsubid = 2 AND l.granted \
               AND l.pid <> pg_backend_pid()",
            &[&MODE_LOCK.0, &MODE_LOCK.1],
        )
        .await;
    match rows {
        Ok(rows) if !rows.is_empty() => rows
            .iter()
            .map(|r| {
                format!(
                    "pid {} ({}, {} from {}, {}, connected {} s)",
                    r.try_get::<_, i32>(0).unwrap_or(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                    r.get::<_, String>(3),
                    r.get::<_, String>(4),
                    r.get::<_, i64>(5)
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        Ok(_) => "none visible".into(),
        Err(e) => format!("not visible: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(w: &mut SharedWrites) -> Vec<&'static str> {
        let mut out = Vec::new();
        w.statements(&mut out);
        out.iter()
            .map(|(sql, _)| match *sql {
                s if s == FENCED_COMPLETE => "complete",
                s if s == FENCED_DELETE => "delete",
                s if s == FENCED_UPDATE => "update",
                s if s.starts_with("INSERT INTO dead_letters") => "bury",
                s if s.starts_with("DELETE FROM dead_letters WHERE seq") => "drop dead",
                s if s.starts_with("INSERT INTO pending") => "put claimed",
                s if s.starts_with("DELETE FROM events") => "collect events",
                _ => "other",
            })
            .collect()
    }

    #[test]
    fn writes_to_one_delivery_keep_their_order_within_a_commit() {
        // Buried, then its dead letter purged: the purge comes after the burial.
        let mut w = SharedWrites::default();
        w.fenced(1, 7, &Fenced::Bury(b"{}".to_vec()));
        w.fenced(2, 7, &Fenced::Delete);
        w.drop_dead(1);
        w.unused_events.push("evt".into());
        assert_eq!(
            kinds(&mut w),
            ["bury", "complete", "delete", "drop dead", "collect events"]
        );
        assert_eq!(w.expected, 2, "the completion and the burial's delete are fenced");
        // Replayed (dead letter dropped, back as waiting), then buried again.
        let mut w = SharedWrites::default();
        w.drop_dead(3);
        w.claimed(3, 7, 0, b"{}".to_vec());
        w.fenced(3, 7, &Fenced::Bury(b"{}".to_vec()));
        assert_eq!(kinds(&mut w), ["drop dead", "put claimed", "bury", "delete"]);
    }
}
