//! Evidence: a signed checkpoint with inclusion proofs of records and consistency proofs
//! from older checkpoints, as one JSON document that checks offline with only the
//! verifier key (by `mailhook audit verify`, or by Go's `sumdb/tlog` and `sumdb/note`).

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::key::{self, Checkpoint, CheckpointError};
use super::{Hash, leaf_hash};

/// The evidence document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The checkpoint everything is proven against, as a signed note.
    pub checkpoint: String,
    #[serde(default)]
    pub inclusion: Vec<Inclusion>,
    #[serde(default)]
    pub consistency: Vec<Consistency>,
}

/// A record and the proof that it is leaf `index` of the checkpoint's tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inclusion {
    pub index: u64,
    /// The leaf's exact bytes, base64.
    pub record: String,
    /// Sibling hashes, base64.
    pub proof: Vec<String>,
}

/// An older checkpoint and the proof that the checkpoint's tree extends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consistency {
    pub old: String,
    pub proof: Vec<String>,
}

pub fn encode(hashes: &[Hash]) -> Vec<String> {
    hashes
        .iter()
        .map(|h| base64::engine::general_purpose::STANDARD.encode(h.0))
        .collect()
}

fn decode(hashes: &[String]) -> Option<Vec<Hash>> {
    hashes
        .iter()
        .map(|s| {
            let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
            Some(Hash(bytes.try_into().ok()?))
        })
        .collect()
}

/// Why evidence does not hold; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("the checkpoint")]
    Checkpoint(#[source] CheckpointError),
    #[error("the record at index {index} is not in the checkpoint's tree (altered, or not the record logged there)")]
    Inclusion { index: u64 },
    #[error("the checkpoint of size {old} is not an earlier state of this log (history was rewritten)")]
    Consistency { old: u64 },
    #[error("the checkpoint of size {old}")]
    OldCheckpoint {
        old: u64,
        #[source]
        source: CheckpointError,
    },
    #[error("{0} is not base64")]
    Encoding(&'static str),
    #[error(
        "a consistency proof carries no older checkpoint (the log kept none of that size): give the witness's with --witness"
    )]
    NoOldCheckpoint,
}

/// What a verification established.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub checkpoint: Checkpoint,
    pub records: Vec<u64>,
    pub extends: Vec<u64>,
}

/// Checks every part of `evidence` against the verifier key `vkey`.
pub fn verify(evidence: &Evidence, vkey: &str) -> Result<Verified, VerifyError> {
    let head = key::open(&evidence.checkpoint, vkey).map_err(VerifyError::Checkpoint)?;
    let mut records = Vec::new();
    for item in &evidence.inclusion {
        let record = base64::engine::general_purpose::STANDARD
            .decode(&item.record)
            .map_err(|_| VerifyError::Encoding("a record"))?;
        let proof = decode(&item.proof).ok_or(VerifyError::Encoding("a proof hash"))?;
        tlog_tiles::check_record(&proof, head.size, head.root, item.index, leaf_hash(&record))
            .map_err(|_| VerifyError::Inclusion { index: item.index })?;
        records.push(item.index);
    }
    let mut extends = Vec::new();
    for item in &evidence.consistency {
        if item.old.trim().is_empty() {
            return Err(VerifyError::NoOldCheckpoint);
        }
        let size = item.old.lines().nth(1).and_then(|l| l.parse().ok()).unwrap_or(0);
        let old = key::open(&item.old, vkey).map_err(|source| VerifyError::OldCheckpoint { old: size, source })?;
        let proof = decode(&item.proof).ok_or(VerifyError::Encoding("a proof hash"))?;
        if old.origin != head.origin {
            return Err(VerifyError::Consistency { old: old.size });
        }
        tlog_tiles::check_tree(&proof, head.size, head.root, old.size, old.root)
            .map_err(|_| VerifyError::Consistency { old: old.size })?;
        extends.push(old.size);
    }
    Ok(Verified {
        checkpoint: head,
        records,
        extends,
    })
}
