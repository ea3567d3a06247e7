//! The audit log: an append-only Merkle tree (RFC 6962 hashing, as Certificate
//! Transparency and Go's checksum database use it) of every event accepted, every delivery
//! attempt and every act of custody, with signed checkpoints an auditor verifies offline.
//!
//! A leaf is a [`Record`]'s JSON; it holds digests and names, never mail content. The store
//! appends leaves inside the same commit as what they record, in commit order, and keeps
//! the tree's stored hashes beside them (`tlog`'s layout: a few hashes per leaf), so a
//! tree head or a proof reads O(log n) hashes. Nothing here reads or writes the store: the
//! engines call [`append`] with the hashes they hold, and readers go through
//! [`HashSource`].

pub mod key;
pub mod proof;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
pub use tlog_tiles::Hash;

/// What one leaf says. Serialized with fixed field order; the bytes are what is hashed,
/// so a record is stored and exported exactly as appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Record {
    /// An event accepted: its id, the SHA-256 of its stored JSON, and where it came from.
    #[serde(rename_all = "camelCase")]
    Event {
        event_id: String,
        sha256: String,
        #[serde(rename = "type")]
        event_type: String,
        source: String,
        /// The SHA-256 of the producer id (which can hold a mailbox address and a
        /// Message-ID): a log that is never rewritten keeps no personal data in clear.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        producer_id_sha256: Option<String>,
        accepted_at: jiff::Timestamp,
    },
    /// A delivery attempt and its outcome: the SHA-256 of the exact bytes sent, and the
    /// index of the event's acceptance when the delivery knew it.
    #[serde(rename_all = "camelCase")]
    Delivery {
        event_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        event_index: Option<u64>,
        subscription: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        webhook_id: Option<String>,
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        http_status: Option<u16>,
        at: jiff::Timestamp,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body_sha256: Option<String>,
    },
    /// Custody: who did what to the data or its access (a grant changed, a raw message
    /// fetched, a hold placed, an export taken, a restore recorded).
    #[serde(rename_all = "camelCase")]
    Custody {
        action: String,
        subject: String,
        by: String,
        at: jiff::Timestamp,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        detail: String,
    },
}

impl Record {
    /// The record of an accepted event whose stored JSON is `stored`.
    pub fn event(event: &crate::event::MailboxEvent, stored: &[u8], accepted_at: jiff::Timestamp) -> Record {
        Record::Event {
            event_id: event.id.clone(),
            sha256: sha256_hex(stored),
            event_type: event.event_type.as_str().to_string(),
            source: event.source.as_str().to_string(),
            producer_id_sha256: event.dedup_key().map(|k| sha256_hex(k.as_bytes())),
            accepted_at,
        }
    }

    /// The leaf of an accepted event, which learns its index once committed.
    pub fn event_leaf(event: &crate::event::MailboxEvent, stored: &[u8], accepted_at: jiff::Timestamp) -> Leaf {
        let mut leaf = Record::event(event, stored, accepted_at).to_leaf();
        leaf.assigned = Some(event.log_index.share());
        leaf
    }

    /// Whether leaf bytes record an event's acceptance (the tag is serialized first).
    pub fn is_acceptance(leaf: &[u8]) -> bool {
        leaf.starts_with(br#"{"kind":"event""#)
    }

    /// The leaf bytes.
    pub fn to_leaf(&self) -> Leaf {
        // A record of strings, numbers and timestamps always serializes.
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        let event_id = match self {
            Record::Event { event_id, .. } | Record::Delivery { event_id, .. } => Some(event_id.clone()),
            Record::Custody { .. } => None,
        };
        let accepted_at_index = match self {
            Record::Delivery { event_index, .. } => *event_index,
            _ => None,
        };
        Leaf {
            bytes,
            event_id,
            accepted_at_index,
            assigned: None,
        }
    }
}

/// A leaf to append: its bytes, and the event it is about (indexed, so that an event's
/// leaves, its acceptance first, are found by its id).
#[derive(Debug, PartialEq, Eq)]
pub struct Leaf {
    pub bytes: Vec<u8>,
    pub event_id: Option<String>,
    /// For a delivery: the index of its event's acceptance, when known (what the embedded
    /// store indexes it by: a small, fixed-width key).
    pub accepted_at_index: Option<u64>,
    /// Told the leaf's index once the commit that appended it succeeded.
    pub assigned: Option<crate::event::LogIndex>,
}

/// A copy of a leaf tells the same waiter (the engines copy leaves into their commits).
impl Clone for Leaf {
    fn clone(&self) -> Leaf {
        Leaf {
            bytes: self.bytes.clone(),
            event_id: self.event_id.clone(),
            accepted_at_index: self.accepted_at_index,
            assigned: self.assigned.as_ref().map(crate::event::LogIndex::share),
        }
    }
}

impl Leaf {
    /// Tells the leaf's index to whoever waits for it (after the commit).
    pub fn committed_at(&self, index: u64) {
        if let Some(slot) = &self.assigned {
            slot.set(index);
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::crypto::hex(&Sha256::digest(bytes))
}

/// Why the tree cannot be read or grown.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("the audit log lacks stored hash {0} (the store was edited or is incomplete)")]
    Missing(u64),
    #[error("audit log: {0}")]
    Tlog(String),
}

impl From<tlog_tiles::Error> for TreeError {
    fn from(e: tlog_tiles::Error) -> TreeError {
        TreeError::Tlog(e.to_string())
    }
}

/// The stored-hash indexes of the complete subtrees that make up a tree of `size` leaves:
/// what [`append`] needs read to add the next leaves, and what a tree head reads.
pub fn frontier(size: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for level in (0..64u8).rev() {
        if size & (1u64 << level) != 0 {
            out.push(tlog_tiles::stored_hash_index(level, (size >> level) - 1));
        }
    }
    out
}

/// The frontier of a tree of `size` leaves packed as its hashes in [`frontier`] order, 32
/// bytes each: what an engine keeps beside the size so that an append reads one row.
pub fn pack_frontier(size: u64, known: &HashMap<u64, Hash>) -> Result<Vec<u8>, TreeError> {
    let mut out = Vec::new();
    for index in frontier(size) {
        let hash = known.get(&index).ok_or(TreeError::Missing(index))?;
        out.extend_from_slice(&hash.0);
    }
    Ok(out)
}

/// [`pack_frontier`]'s bytes back as hashes by stored index; bytes of the wrong length (an
/// edited head) are refused.
pub fn unpack_frontier(size: u64, packed: &[u8]) -> Result<HashMap<u64, Hash>, TreeError> {
    let indexes = frontier(size);
    if packed.len() != indexes.len() * 32 {
        return Err(TreeError::Tlog(format!(
            "the log's head holds {} bytes of frontier for {size} leaves, not {}",
            packed.len(),
            indexes.len() * 32
        )));
    }
    Ok(indexes
        .into_iter()
        .zip(packed.chunks_exact(32))
        .filter_map(|(i, c)| <[u8; 32]>::try_from(c).ok().map(|h| (i, Hash(h))))
        .collect())
}

/// Hashes by stored index, as a `tlog` reader.
struct Known<'a>(&'a HashMap<u64, Hash>);

impl tlog_tiles::HashReader for Known<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|i| self.0.get(i).copied().ok_or(tlog_tiles::Error::IndexesNotInTree))
            .collect()
    }
}

/// Appends `leaves` to a tree of `size` leaves whose [`frontier`] hashes are `frontier`:
/// the stored hashes to write, as (stored index, hash), in order.
pub fn append(size: u64, frontier: HashMap<u64, Hash>, leaves: &[Leaf]) -> Result<Stored, TreeError> {
    let mut known = frontier;
    let mut out = Vec::with_capacity(leaves.len() * 2);
    let mut next = tlog_tiles::stored_hash_count(size);
    for (i, leaf) in leaves.iter().enumerate() {
        let n = size + i as u64;
        let hashes = tlog_tiles::stored_hashes(n, &leaf.bytes, &Known(&known))?;
        for h in hashes {
            known.insert(next, h);
            out.push((next, h));
            next += 1;
        }
    }
    Ok(out)
}

/// What an append writes: the new stored hashes as (stored index, hash), in order.
pub type Stored = Vec<(u64, Hash)>;

/// [`append`] for an engine that keeps the frontier packed ([`pack_frontier`]): the stored
/// hashes to write and the packed frontier of the grown tree.
pub fn append_packed(size: u64, packed: &[u8], leaves: &[Leaf]) -> Result<(Stored, Vec<u8>), TreeError> {
    let mut known = unpack_frontier(size, packed)?;
    let stored = append(size, known.clone(), leaves)?;
    known.extend(stored.iter().copied());
    let grown = pack_frontier(size + leaves.len() as u64, &known)?;
    Ok((stored, grown))
}

/// Where stored hashes are read from (a store, a bundle).
pub trait HashSource {
    /// The hashes at `indexes`, in that order; an index missing is an error.
    fn hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, TreeError>;
}

/// A `tlog` reader over a source, keeping the source's own error (tlog's has no room for
/// it) so that a store that cannot be read is told apart from a tree that is wrong.
struct Reader<'a> {
    source: &'a dyn HashSource,
    failed: std::cell::RefCell<Option<TreeError>>,
}

impl tlog_tiles::HashReader for Reader<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        match self.source.hashes(indexes) {
            Ok(got) if got.len() == indexes.len() => Ok(got),
            Ok(_) => Err(tlog_tiles::Error::IndexesNotInTree),
            Err(e) => {
                *self.failed.borrow_mut() = Some(e);
                Err(tlog_tiles::Error::IndexesNotInTree)
            }
        }
    }
}

fn read<T>(
    source: &dyn HashSource,
    f: impl FnOnce(&Reader<'_>) -> Result<T, tlog_tiles::Error>,
) -> Result<T, TreeError> {
    let reader = Reader {
        source,
        failed: std::cell::RefCell::new(None),
    };
    let result = f(&reader);
    match (result, reader.failed.into_inner()) {
        (Ok(v), _) => Ok(v),
        (Err(_), Some(source_error)) => Err(source_error),
        (Err(e), None) => Err(e.into()),
    }
}

/// The root hash of the tree's first `size` leaves.
pub fn root(size: u64, source: &dyn HashSource) -> Result<Hash, TreeError> {
    read(source, |r| tlog_tiles::tree_hash(size, r))
}

/// The inclusion proof of leaf `index` in the tree of `size` leaves.
pub fn prove_leaf(size: u64, index: u64, source: &dyn HashSource) -> Result<Vec<Hash>, TreeError> {
    read(source, |r| tlog_tiles::prove_record(size, index, r))
}

/// The consistency proof from the tree of `old` leaves to the tree of `size` leaves.
pub fn prove_consistency(size: u64, old: u64, source: &dyn HashSource) -> Result<Vec<Hash>, TreeError> {
    read(source, |r| tlog_tiles::prove_tree(size, old, r))
}

/// The RFC 6962 hash of a leaf's bytes.
pub fn leaf_hash(bytes: &[u8]) -> Hash {
    tlog_tiles::record_hash(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hashes kept in memory, as a store keeps them.
    #[derive(Default)]
    struct Memory(HashMap<u64, Hash>, u64);

    impl HashSource for Memory {
        fn hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, TreeError> {
            indexes
                .iter()
                .map(|i| self.0.get(i).copied().ok_or(TreeError::Missing(*i)))
                .collect()
        }
    }

    impl Memory {
        fn add(&mut self, leaves: &[Leaf]) {
            let frontier = frontier(self.1).into_iter().map(|i| (i, self.0[&i])).collect();
            for (i, h) in append(self.1, frontier, leaves).expect("append") {
                self.0.insert(i, h);
            }
            self.1 += leaves.len() as u64;
        }
    }

    #[test]
    fn a_packed_frontier_grows_the_same_tree_as_stored_hashes() {
        let mut tree = Memory::default();
        let mut packed = Vec::new();
        let mut n = 0;
        for batch in [1u64, 1, 2, 3, 7, 1, 16, 33] {
            let leaves: Vec<Leaf> = (n..n + batch).map(leaf).collect();
            let (stored, grown) = append_packed(n, &packed, &leaves).expect("append");
            let before: HashMap<u64, Hash> = frontier(n).into_iter().map(|i| (i, tree.0[&i])).collect();
            assert_eq!(stored, append(n, before, &leaves).expect("append"), "size {n}");
            tree.add(&leaves);
            n += batch;
            assert_eq!(grown, pack_frontier(n, &tree.0).expect("pack"), "size {n}");
            packed = grown;
        }
        // A head whose frontier was cut is refused, not read short.
        assert!(append_packed(n, &packed[..packed.len() - 1], &[leaf(n)]).is_err());
    }

    fn leaf(n: u64) -> Leaf {
        Leaf {
            bytes: format!("leaf {n}").into_bytes(),
            event_id: None,
            accepted_at_index: None,
            assigned: None,
        }
    }

    /// The RFC 6962 tree hash, computed the slow way from the definition.
    fn mth(leaves: &[Vec<u8>]) -> Hash {
        match leaves.len() {
            0 => tlog_tiles::EMPTY_HASH,
            1 => leaf_hash(&leaves[0]),
            n => {
                let k = (n as u64).next_power_of_two() as usize / 2;
                let k = if k == n { k / 2 } else { k };
                tlog_tiles::node_hash(mth(&leaves[..k]), mth(&leaves[k..]))
            }
        }
    }

    #[test]
    fn appending_in_batches_gives_the_rfc_6962_root_and_proofs_that_check() {
        let mut tree = Memory::default();
        let mut all = Vec::new();
        // Batches of every size, so frontiers of every shape are read.
        let mut n = 0;
        for batch in [1u64, 2, 3, 1, 5, 8, 13, 1, 30] {
            let leaves: Vec<Leaf> = (n..n + batch).map(leaf).collect();
            all.extend(leaves.iter().map(|l| l.bytes.clone()));
            tree.add(&leaves);
            n += batch;
            assert_eq!(root(n, &tree).expect("root"), mth(&all), "size {n}");
        }
        let size = tree.1;
        let top = root(size, &tree).expect("root");
        for i in [0, 1, 7, 31, size - 1] {
            let proof = prove_leaf(size, i, &tree).expect("prove");
            tlog_tiles::check_record(&proof, size, top, i, leaf_hash(&all[i as usize])).expect("checks");
            assert!(tlog_tiles::check_record(&proof, size, top, i, leaf_hash(b"forged")).is_err());
        }
        for old in [1, 6, 32, size - 1] {
            let old_root = root(old, &tree).expect("old root");
            let proof = prove_consistency(size, old, &tree).expect("prove");
            tlog_tiles::check_tree(&proof, size, top, old, old_root).expect("consistent");
            let forked = mth(&[b"another history".to_vec()]);
            assert!(tlog_tiles::check_tree(&proof, size, top, old, forked).is_err());
        }
    }

    #[test]
    fn a_missing_stored_hash_is_an_error_not_a_panic() {
        let mut tree = Memory::default();
        tree.add(&(0..10).map(leaf).collect::<Vec<_>>());
        tree.0.remove(&frontier(10)[0]);
        assert!(root(10, &tree).is_err());
        // Leaf 9's proof needs the removed hash of leaves 0..8.
        assert!(prove_leaf(10, 9, &tree).is_err());
    }

    #[test]
    fn a_record_serializes_in_one_fixed_form() {
        let at: jiff::Timestamp = "2026-01-02T03:04:05Z".parse().expect("time");
        let r = Record::Delivery {
            event_id: "evt_1".into(),
            event_index: Some(7),
            subscription: "uid-1".into(),
            webhook_id: Some("msg_1".into()),
            attempt: 2,
            http_status: Some(200),
            at,
            body_sha256: Some("ab".into()),
        };
        let leaf = r.to_leaf();
        assert_eq!(
            String::from_utf8(leaf.bytes.clone()).expect("utf8"),
            r#"{"kind":"delivery","eventId":"evt_1","eventIndex":7,"subscription":"uid-1","webhookId":"msg_1","attempt":2,"httpStatus":200,"at":"2026-01-02T03:04:05Z","bodySha256":"ab"}"#
        );
        assert_eq!(serde_json::from_slice::<Record>(&leaf.bytes).expect("parse"), r);
        assert!(!Record::is_acceptance(&leaf.bytes));
        let event: crate::event::MailboxEvent = serde_json::from_value(serde_json::json!({
            "id": "evt_1", "type": "message.received", "occurredAt": "2026-01-01T00:00:00Z",
            "receivedAt": "2026-01-01T00:00:00Z", "source": "http", "mailbox": "a@b.example"
        }))
        .expect("event");
        assert!(Record::is_acceptance(&Record::event(&event, b"{}", at).to_leaf().bytes));
    }
}
