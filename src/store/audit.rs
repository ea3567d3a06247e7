//! The audit log as the store keeps it (`crate::audit` says what it is): leaves appended
//! in the commits of what they record, read back with the tree's stored hashes for tree
//! heads and proofs. Every engine keeps it; replicas sharing a database grow one tree.

use super::StoreError;
use crate::audit::{Hash, HashSource, Record, TreeError};

/// The audit log of a store.
pub trait AuditTrail: Send + Sync {
    /// Leaves appended so far.
    fn audit_size(&self) -> Result<u64, StoreError>;
    /// Stored hashes by index, in that order (None where missing).
    fn audit_hashes(&self, indexes: &[u64]) -> Result<Vec<Option<[u8; 32]>>, StoreError>;
    /// Leaves with index in `from..to`, in order.
    fn audit_records(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// The leaves about an event, in order: its acceptance first, then its deliveries.
    fn audit_leaves_of(&self, event_id: &str) -> Result<Vec<u64>, StoreError>;
    /// Appends a record of its own (custody), durably before it returns; its index.
    fn audit_append(&self, record: &Record) -> Result<Option<u64>, StoreError>;
    /// The signed checkpoint of tree size `size`, or the newest: (size, note).
    fn audit_checkpoint(&self, size: Option<u64>) -> Result<Option<(u64, Vec<u8>)>, StoreError>;
    /// Keeps a signed checkpoint (one already kept for that size stays), durably.
    fn audit_keep_checkpoint(&self, size: u64, note: Vec<u8>) -> Result<(), StoreError>;
}

/// A store's audit log as a source of stored hashes for the tree functions.
pub struct Hashes<'a>(pub &'a dyn AuditTrail);

impl HashSource for Hashes<'_> {
    fn hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, TreeError> {
        let got = self
            .0
            .audit_hashes(indexes)
            .map_err(|e| TreeError::Tlog(e.to_string()))?;
        indexes
            .iter()
            .zip(got)
            .map(|(i, h)| h.map(Hash).ok_or(TreeError::Missing(*i)))
            .collect()
    }
}

/// Implements `AuditTrail` for a store with an `engine` field and a `wait_for(ops, kept)`
/// that commits and waits.
macro_rules! audit_on_engine {
    ($store:ty) => {
        impl $crate::store::audit::AuditTrail for $store {
            fn audit_size(&self) -> Result<u64, StoreError> {
                self.engine.audit_size()
            }

            fn audit_hashes(&self, indexes: &[u64]) -> Result<Vec<Option<[u8; 32]>>, StoreError> {
                self.engine.audit_hashes(indexes)
            }

            fn audit_records(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
                self.engine.audit_records(from, to)
            }

            fn audit_leaves_of(&self, event_id: &str) -> Result<Vec<u64>, StoreError> {
                self.engine.audit_leaves_of(event_id)
            }

            fn audit_append(&self, record: &$crate::audit::Record) -> Result<Option<u64>, StoreError> {
                let mut leaf = record.to_leaf();
                let index = $crate::event::LogIndex::default();
                leaf.assigned = Some(index.share());
                self.wait_for(
                    vec![$crate::store::durable::committer::Op::Audit(Box::new(leaf))],
                    false,
                )?;
                Ok(index.get())
            }

            fn audit_checkpoint(&self, size: Option<u64>) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
                self.engine.audit_checkpoint(size)
            }

            fn audit_keep_checkpoint(&self, size: u64, note: Vec<u8>) -> Result<(), StoreError> {
                self.wait_for(
                    vec![$crate::store::durable::committer::Op::AuditCheckpoint(size, note)],
                    false,
                )
            }
        }
    };
}
pub(crate) use audit_on_engine;
