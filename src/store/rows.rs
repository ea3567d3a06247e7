//! Keyed rows: what a source keeps beside its events so that a later change can be told
//! from a repeat (the Dovecot source's mailbox index is one). Each row lives in a group
//! (a mailbox, say), under a key that sorts as the source lays it out, with the time it
//! was written (retention counts from there) and a body only its source reads. Rows are
//! written in the same commit as the events they came with (`EventLog::ingest_with_rows`)
//! or alone (`Rows::write_rows`). The store knows nothing of what a key or a body means.
//!
//! Stored as one byte key per row, `group NUL key`, so that a group's rows sort together
//! and a prefix scan is one range read on every engine.

use super::StoreError;
use super::durable::committer::Op;
use super::durable::engine::{Engine, prefix_end};

/// One row as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The key within its group.
    pub key: Vec<u8>,
    /// Unix seconds it was written (as its source said).
    pub at: i64,
    pub body: Vec<u8>,
}

/// A write to one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowWrite {
    Put { group: String, row: Row },
    Delete { group: String, key: Vec<u8> },
}

/// The keyed rows of a store.
pub trait Rows: Send + Sync {
    /// The rows of `group` whose key starts with `prefix`, in key order.
    fn rows(&self, group: &str, prefix: &[u8]) -> Result<Vec<Row>, StoreError>;
    /// One row.
    fn row(&self, group: &str, key: &[u8]) -> Result<Option<Row>, StoreError>;
    /// Every group with a row, in order.
    fn row_groups(&self) -> Result<Vec<String>, StoreError>;
    /// (group, key) of every row written before `before` (unix seconds).
    fn rows_before(&self, before: i64) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Applies `writes` in one durable commit.
    fn write_rows(&self, writes: Vec<RowWrite>) -> Result<(), StoreError>;
}

/// Groups mailhook keeps for itself, beside those its sources name after a mailbox, begin
/// with this character, which no mailbox name holds (sources drop control characters).
const RESERVED: char = '\u{1}';

/// The group `name` of mailhook's own (see `is_reserved`).
pub fn reserved_group(name: &str) -> String {
    format!("{RESERVED}{name}")
}

/// Whether `group` is one of mailhook's own, not a mailbox's.
pub fn is_reserved(group: &str) -> bool {
    group.starts_with(RESERVED)
}

/// Whether `group` can name a group: not empty, no NUL (the stored key's separator).
pub fn valid_group(group: &str) -> bool {
    !group.is_empty() && !group.contains('\0')
}

fn stored_key(group: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + 1 + key.len());
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

/// (group, key) of a stored key; None for one this module did not write.
fn split_key(stored: &[u8]) -> Option<(String, Vec<u8>)> {
    let at = stored.iter().position(|b| *b == 0)?;
    let (group, rest) = stored.split_at(at);
    let group = std::str::from_utf8(group).ok()?.to_string();
    Some((group, rest.get(1..).unwrap_or_default().to_vec()))
}

/// The engine's writes for `writes`; a write to an invalid group is refused whole.
pub(crate) fn ops(writes: Vec<RowWrite>) -> Result<Vec<Op>, StoreError> {
    writes
        .into_iter()
        .map(|w| {
            let group = match &w {
                RowWrite::Put { group, .. } | RowWrite::Delete { group, .. } => group,
            };
            if !valid_group(group) {
                return Err(StoreError::Invalid(format!(
                    "row group {group:?} is empty or holds a NUL byte"
                )));
            }
            Ok(match w {
                RowWrite::Put { group, row } => Op::PutRow(stored_key(&group, &row.key), group, row.at, row.body),
                RowWrite::Delete { group, key } => Op::DeleteRow(stored_key(&group, &key)),
            })
        })
        .collect()
}

/// `Rows::rows` on an engine.
pub(crate) fn scan(engine: &dyn Engine, group: &str, prefix: &[u8]) -> Result<Vec<Row>, StoreError> {
    if !valid_group(group) {
        return Ok(Vec::new());
    }
    let start = stored_key(group, prefix);
    let skip = group.len() + 1;
    Ok(engine
        .rows_scan(&start, &prefix_end(&start))?
        .into_iter()
        .map(|(stored, at, body)| Row {
            key: stored.get(skip..).unwrap_or_default().to_vec(),
            at,
            body,
        })
        .collect())
}

/// `Rows::row` on an engine.
pub(crate) fn get(engine: &dyn Engine, group: &str, key: &[u8]) -> Result<Option<Row>, StoreError> {
    if !valid_group(group) {
        return Ok(None);
    }
    Ok(engine.row_get(&stored_key(group, key))?.map(|(at, body)| Row {
        key: key.to_vec(),
        at,
        body,
    }))
}

/// `Rows::rows_before` on an engine.
pub(crate) fn before(engine: &dyn Engine, before: i64) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    Ok(engine
        .rows_before(before)?
        .iter()
        .filter_map(|k| split_key(k))
        .collect())
}

/// Implements `Rows` for a store with an `engine` field and a `wait_for(ops, kept)` that
/// commits and waits.
macro_rules! rows_on_engine {
    ($store:ty) => {
        impl $crate::store::rows::Rows for $store {
            fn rows(&self, group: &str, prefix: &[u8]) -> Result<Vec<$crate::store::rows::Row>, StoreError> {
                $crate::store::rows::scan(self.engine.as_ref(), group, prefix)
            }

            fn row(&self, group: &str, key: &[u8]) -> Result<Option<$crate::store::rows::Row>, StoreError> {
                $crate::store::rows::get(self.engine.as_ref(), group, key)
            }

            fn row_groups(&self) -> Result<Vec<String>, StoreError> {
                self.engine.row_groups()
            }

            fn rows_before(&self, before: i64) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
                $crate::store::rows::before(self.engine.as_ref(), before)
            }

            fn write_rows(&self, writes: Vec<$crate::store::rows::RowWrite>) -> Result<(), StoreError> {
                let ops = $crate::store::rows::ops(writes)?;
                if ops.is_empty() {
                    return Ok(());
                }
                self.wait_for(ops, false)
            }
        }
    };
}
pub(crate) use rows_on_engine;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_keys_split_back_and_sort_by_group() {
        let k = stored_key("zoë", &[0, 1, 0xff]);
        assert_eq!(split_key(&k), Some(("zoë".to_string(), vec![0, 1, 0xff])));
        assert!(
            stored_key("a", b"zzz") < stored_key("ab", b""),
            "a group's rows sort together"
        );
        assert_eq!(split_key(b"no separator"), None);
    }

    #[test]
    fn a_write_to_a_group_with_a_nul_is_refused() {
        let bad = RowWrite::Delete {
            group: "a\0b".into(),
            key: vec![],
        };
        assert!(matches!(ops(vec![bad]), Err(StoreError::Invalid(_))));
        assert!(!valid_group(""));
    }
}
