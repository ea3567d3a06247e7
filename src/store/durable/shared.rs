//! Shared mode: the durable store when several replicas share one PostgreSQL database.
//! Memory holds only the shards this replica owns; new events go to the database alone
//! (de-duplicated and numbered there) and reach memory when their shard's owner claims
//! them. Every write to a delivery carries the epoch it was claimed under, so a replica
//! that lost a shard cannot change what the new owner now holds.
//!
//! This file owns the types of those writes, what the database beneath must offer for them
//! (`SharedEngine`), and the rewrite of the store's ordinary writes into fenced ones.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::committer::Op;
use crate::store::{Appended, PublishedHealth, StoreError};

/// One event of a shared ingest.
#[derive(Clone)]
pub struct IngestItem {
    pub producer: Option<String>,
    pub event_id: String,
    /// The event's JSON; None when nobody subscribed (only its producer id is kept).
    pub event: Option<Vec<u8>>,
    /// (subscription, shard, stored delivery JSON), in the order enqueued.
    pub deliveries: Vec<(String, i32, Vec<u8>)>,
}

/// The events of one `ingest` call, and where the outcome goes once committed.
#[derive(Clone)]
pub struct IngestBatch {
    pub items: Vec<IngestItem>,
    /// Unix seconds.
    pub seen_at: i64,
    /// (SHA-256, archived at, bytes), archived when a stored event refers to it.
    pub raw: Option<(String, i64, Vec<u8>)>,
    pub outcome: Arc<Mutex<Option<Vec<Appended>>>>,
}

/// A write to a claimed delivery.
pub enum Fenced {
    /// Done (delivered, or its subscription forgot it).
    Delete,
    /// Tried and due again: the new stored JSON.
    Update(Vec<u8>),
    /// Given up: moved to the dead letters with this JSON.
    Bury(Vec<u8>),
}

/// Rows a claim loaded: (seq, stored JSON).
#[derive(Default)]
pub struct Claimed {
    pub pending: Vec<(u64, Vec<u8>)>,
    pub dead: Vec<(u64, Vec<u8>)>,
}

/// What shared mode needs from the database beyond `Engine`.
pub trait SharedEngine: Send + Sync + 'static {
    /// Every waiting delivery of `shard`, claimed under `epoch`, and its dead letters.
    fn claim_shard(&self, shard: u32, epoch: u64) -> Result<Claimed, StoreError>;
    /// Unclaimed deliveries of the shards in `owned` (shard, epoch), claimed now — only
    /// where the epoch is still the shard's current one: (seq, epoch, stored JSON).
    fn claim_arrivals(&self, owned: &[(u32, u64)]) -> Result<Vec<(u64, u64, Vec<u8>)>, StoreError>;
    /// Events' JSON by id (absent ones skipped).
    fn events(&self, ids: &[String]) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// (subscription, attempts logged, newest key) of every subscription with attempts.
    fn attempt_counts(&self) -> Result<Vec<(String, u64, u64)>, StoreError>;
    /// Deletes producer ids first seen before `before` (unix s); returns how many.
    fn purge_producers(&self, before: i64) -> Result<u64, StoreError>;
    fn collect_events(&self) -> Result<u64, StoreError>;
    /// Every subscription the database holds anything for, with its namespace if noted.
    fn subscriptions(&self) -> Result<Vec<(String, Option<String>)>, StoreError>;
    fn publish_health(&self, owner: &str, rows: Vec<(String, String)>) -> Result<(), StoreError>;
    fn published_health(&self) -> Result<Vec<PublishedHealth>, StoreError>;
    fn forget_health(&self, uids: &[String]) -> Result<(), StoreError>;
    /// A subscription's dead letters on `shard`: (seq, stored JSON).
    fn dead_letters_of(&self, shard: u32, subscription: &str) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// Waiting deliveries over every shard.
    fn pending_count(&self) -> Result<u64, StoreError>;
    /// Fenced writes refused so far.
    fn fenced_writes(&self) -> u64;
}

/// The shared side of a `DurableStore`.
pub(super) struct Shared {
    pub(super) engine: Arc<dyn SharedEngine>,
    pub(super) shards: usize,
    /// The shards owned, by epoch of their claim.
    pub(super) owned: Mutex<HashMap<u32, u64>>,
    /// The epoch each delivery in memory was claimed under (in flight ones too, after
    /// their shard was let go: their writes stay fenced by it).
    pub(super) claims: Mutex<HashMap<u64, u64>>,
}

impl Shared {
    pub(super) fn shard(&self, subscription: &str) -> u32 {
        crate::store::shard_of(subscription, self.shards) as u32
    }

    pub(super) fn owns_subscription(&self, subscription: &str) -> bool {
        self.owned.lock().contains_key(&self.shard(subscription))
    }

    /// Rewrites the store's ordinary writes for a shared database: delivery writes fenced
    /// by their claim (a completed or buried delivery's claim is let go), event deletes made
    /// conditional on nothing else referring to the event. A delivery write without a
    /// known claim is dropped: this replica never loaded it, so it is not its to change.
    pub(super) fn fence(&self, ops: Vec<Op>) -> Vec<Op> {
        let mut claims = self.claims.lock();
        let mut out = Vec::with_capacity(ops.len());
        let mut ops = ops.into_iter().peekable();
        while let Some(op) = ops.next() {
            match op {
                Op::DeletePending(seq) => {
                    // A move to the dead letters is a delete followed by a put of the same seq.
                    let bury = matches!(ops.peek(), Some(Op::PutDead(next, _)) if *next == seq);
                    let Some(epoch) = claims.remove(&seq) else {
                        if bury {
                            ops.next();
                        }
                        continue;
                    };
                    if bury {
                        if let Some(Op::PutDead(_, body)) = ops.next() {
                            out.push(Op::Fenced(seq, epoch, Fenced::Bury(body)));
                        }
                    } else {
                        out.push(Op::Fenced(seq, epoch, Fenced::Delete));
                    }
                }
                Op::PutPending(seq, body) => {
                    if let Some(epoch) = claims.get(&seq) {
                        out.push(Op::Fenced(seq, *epoch, Fenced::Update(body)));
                    }
                }
                Op::DeleteEvent(id) => out.push(Op::DeleteEventIfUnused(id)),
                Op::DeleteDead(seq) => out.push(Op::DropDead(seq)),
                other => out.push(other),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;
    impl SharedEngine for Nothing {
        fn claim_shard(&self, _: u32, _: u64) -> Result<Claimed, StoreError> {
            Ok(Claimed::default())
        }
        fn claim_arrivals(&self, _: &[(u32, u64)]) -> Result<Vec<(u64, u64, Vec<u8>)>, StoreError> {
            Ok(vec![])
        }
        fn events(&self, _: &[String]) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            Ok(vec![])
        }
        fn attempt_counts(&self) -> Result<Vec<(String, u64, u64)>, StoreError> {
            Ok(vec![])
        }
        fn purge_producers(&self, _: i64) -> Result<u64, StoreError> {
            Ok(0)
        }
        fn collect_events(&self) -> Result<u64, StoreError> {
            Ok(0)
        }
        fn subscriptions(&self) -> Result<Vec<(String, Option<String>)>, StoreError> {
            Ok(vec![])
        }
        fn publish_health(&self, _: &str, _: Vec<(String, String)>) -> Result<(), StoreError> {
            Ok(())
        }
        fn published_health(&self) -> Result<Vec<PublishedHealth>, StoreError> {
            Ok(vec![])
        }
        fn forget_health(&self, _: &[String]) -> Result<(), StoreError> {
            Ok(())
        }
        fn dead_letters_of(&self, _: u32, _: &str) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
            Ok(vec![])
        }
        fn pending_count(&self) -> Result<u64, StoreError> {
            Ok(0)
        }
        fn fenced_writes(&self) -> u64 {
            0
        }
    }

    #[test]
    fn writes_are_fenced_by_their_claim_and_unknown_deliveries_are_left_alone() {
        let shared = Shared {
            engine: Arc::new(Nothing),
            shards: 4,
            owned: Mutex::default(),
            claims: Mutex::new(HashMap::from([(1, 7), (2, 7), (3, 9)])),
        };
        let out = shared.fence(vec![
            Op::DeletePending(1),
            Op::DeleteEvent("evt".into()),
            Op::DeletePending(2),
            Op::PutDead(2, b"dead".to_vec()),
            Op::PutPending(3, b"again".to_vec()),
            // Never claimed here: another replica's.
            Op::DeletePending(4),
            Op::PutDead(4, b"x".to_vec()),
            Op::PutPending(5, b"y".to_vec()),
            Op::DeleteDead(6),
        ]);
        let shape: Vec<String> = out
            .iter()
            .map(|op| match op {
                Op::Fenced(seq, epoch, Fenced::Delete) => format!("delete {seq}@{epoch}"),
                Op::Fenced(seq, epoch, Fenced::Bury(_)) => format!("bury {seq}@{epoch}"),
                Op::Fenced(seq, epoch, Fenced::Update(_)) => format!("update {seq}@{epoch}"),
                Op::DeleteEventIfUnused(id) => format!("collect {id}"),
                Op::DropDead(seq) => format!("delete dead {seq}"),
                _ => "other".into(),
            })
            .collect();
        assert_eq!(
            shape,
            ["delete 1@7", "collect evt", "bury 2@7", "update 3@9", "delete dead 6"]
        );
        let claims = shared.claims.lock();
        assert_eq!(
            claims.len(),
            1,
            "done deliveries let go of their claim; a retried one keeps it"
        );
        assert_eq!(claims.get(&3), Some(&9));
    }
}
