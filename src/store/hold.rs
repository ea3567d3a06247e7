//! What LegalHolds keep from the purges. The store knows nothing of holds but what it is
//! asked (`Holds`): before a purge deletes an attempt, a dead letter or an archived raw
//! message, it asks whether a hold keeps a record of that mailbox made at that time, keeps
//! the record if one does, and counts it for that hold. An archived raw message carries the
//! mailboxes of the events that referred to it in an index of its own (rows of the
//! reserved group `RAW_MAILBOXES`, written in the commit that archived it), so a hold
//! placed after the fact still finds it.

use std::collections::BTreeMap;

use super::StoreError;
use super::durable::committer::Op;
use super::durable::engine::Engine;

/// The holds the purges ask.
pub trait Holds: Sync {
    /// Whether any hold is in force (when none is, purges read nothing more).
    fn any(&self) -> bool;
    /// The holds that keep a record of `mailbox` made at `at`.
    fn holding(&self, mailbox: &str, at: jiff::Timestamp) -> Vec<String>;
}

/// No hold in force.
pub struct NoHolds;

impl Holds for NoHolds {
    fn any(&self) -> bool {
        false
    }

    fn holding(&self, _mailbox: &str, _at: jiff::Timestamp) -> Vec<String> {
        Vec::new()
    }
}

/// Records past their retention that one hold kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeptRecords {
    pub raw_messages: u64,
    pub raw_message_bytes: u64,
    pub attempts: u64,
    pub dead_letters: u64,
}

/// What holds kept from a purge, by hold name.
pub type Kept = BTreeMap<String, KeptRecords>;

/// Adds up what `from` kept into `into`.
pub fn add_kept(into: &mut Kept, from: &Kept) {
    for (hold, k) in from {
        let to = into.entry(hold.clone()).or_default();
        to.raw_messages += k.raw_messages;
        to.raw_message_bytes += k.raw_message_bytes;
        to.attempts += k.attempts;
        to.dead_letters += k.dead_letters;
    }
}

/// The reserved row group indexing archived raw messages by mailbox: key
/// `sha256 NUL mailbox`, body the message's size (8 bytes, little-endian).
pub fn raw_mailboxes_group() -> String {
    super::rows::reserved_group("raw-mailboxes")
}

/// The index rows of a raw message of `size` bytes archived at `at` (unix seconds) for
/// events of `mailboxes`.
pub fn raw_index_rows(sha256: &str, size: usize, at: i64, mailboxes: &[String]) -> Vec<super::RowWrite> {
    let group = raw_mailboxes_group();
    let mut seen: Vec<&str> = mailboxes.iter().map(String::as_str).collect();
    seen.sort_unstable();
    seen.dedup();
    seen.into_iter()
        .map(|mailbox| super::RowWrite::Put {
            group: group.clone(),
            row: super::rows::Row {
                key: [sha256.as_bytes(), b"\0", mailbox.as_bytes()].concat(),
                at,
                body: (size as u64).to_le_bytes().to_vec(),
            },
        })
        .collect()
}

/// `raw_index_rows` as the engine's writes.
pub(crate) fn raw_index_ops(sha256: &str, size: usize, at: i64, mailboxes: &[String]) -> Result<Vec<Op>, StoreError> {
    super::rows::ops(raw_index_rows(sha256, size, at, mailboxes))
}

/// The writes that archive `raw` at `at` for events of `mailboxes`: the message and its
/// mailbox index, in one commit with them.
pub(crate) fn archive_ops(raw: super::RawMessage, at: i64, mailboxes: &[String]) -> Result<Vec<Op>, StoreError> {
    let mut ops = raw_index_ops(&raw.sha256, raw.bytes.len(), at, mailboxes)?;
    ops.push(Op::PutRaw(raw.sha256, at, raw.bytes));
    Ok(ops)
}

/// The writes that delete the raw messages archived before `before` that no hold keeps
/// (with their index rows); what holds keep is counted in `kept`.
pub(crate) fn purge_raw_ops(
    engine: &dyn Engine,
    before: jiff::Timestamp,
    holds: &dyn Holds,
    kept: &mut Kept,
) -> Result<Vec<Op>, StoreError> {
    let group = raw_mailboxes_group();
    let mut ops = Vec::new();
    for (at, sha256) in engine.raw_before(before.as_second())? {
        let index = super::rows::scan(engine, &group, &[sha256.as_bytes(), b"\0"].concat())?;
        if holds.any() {
            let when = jiff::Timestamp::from_second(at).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
            let mut holding: Vec<String> = index
                .iter()
                .filter_map(|row| row.key.get(sha256.len() + 1..))
                .filter_map(|mailbox| std::str::from_utf8(mailbox).ok())
                .flat_map(|mailbox| holds.holding(mailbox, when))
                .collect();
            holding.sort_unstable();
            holding.dedup();
            if !holding.is_empty() {
                let size = index
                    .first()
                    .and_then(|row| <[u8; 8]>::try_from(row.body.as_slice()).ok())
                    .map_or(0, u64::from_le_bytes);
                for hold in holding {
                    let k = kept.entry(hold).or_default();
                    k.raw_messages += 1;
                    k.raw_message_bytes += size;
                }
                continue;
            }
        }
        for row in index {
            ops.extend(super::rows::ops(vec![super::RowWrite::Delete {
                group: group.clone(),
                key: row.key,
            }])?);
        }
        ops.push(Op::DeleteRaw(at, sha256));
    }
    Ok(ops)
}

/// How many raw messages `ops` delete.
pub(crate) fn raw_deletes(ops: &[Op]) -> u64 {
    ops.iter().filter(|op| matches!(op, Op::DeleteRaw(..))).count() as u64
}

/// The write that trims a subscription's oldest `n` attempts (`n` > 0): all of them when
/// no hold is in force; otherwise those read and judged, up to the last one's key, but the
/// keys of those a hold keeps (counted in `kept`). Returns the write and how many it
/// deletes.
pub(crate) fn trim_attempts(
    engine: &dyn Engine,
    subscription: &str,
    n: u64,
    holds: &dyn Holds,
    kept: &mut Kept,
) -> Result<(Op, u64), StoreError> {
    if !holds.any() {
        return Ok((Op::TrimAttempts(subscription.to_string(), n), n));
    }
    let oldest = engine.oldest_attempts(subscription, usize::try_from(n).unwrap_or(usize::MAX))?;
    let through = oldest.last().map_or(0, |(key, _)| *key);
    let mut keep = Vec::new();
    for (key, body) in &oldest {
        let Ok(attempt) = serde_json::from_slice::<super::Attempt>(body) else {
            continue;
        };
        let Some(mailbox) = attempt.mailbox.as_deref() else {
            continue;
        };
        let holding = holds.holding(mailbox, attempt.at);
        if !holding.is_empty() {
            for hold in holding {
                kept.entry(hold).or_default().attempts += 1;
            }
            keep.push(*key);
        }
    }
    let deleted = (oldest.len() - keep.len()) as u64;
    Ok((
        Op::TrimAttemptsThrough(subscription.to_string(), through, keep),
        deleted,
    ))
}

/// Of dead letters' events, the ids a hold keeps (counted in `kept`). An event that can
/// no longer be read is not held.
pub(crate) fn held_events(
    engine: &dyn Engine,
    ids: &[String],
    holds: &dyn Holds,
    kept: &mut Kept,
) -> Result<std::collections::HashSet<String>, StoreError> {
    let mut held = std::collections::HashSet::new();
    if ids.is_empty() || !holds.any() {
        return Ok(held);
    }
    for (id, body) in engine.events_by_id(ids)? {
        let Ok(event) = serde_json::from_slice::<crate::event::MailboxEvent>(&body) else {
            continue;
        };
        let holding = holds.holding(&event.mailbox, event.received_at);
        if !holding.is_empty() {
            for hold in holding {
                kept.entry(hold).or_default().dead_letters += 1;
            }
            held.insert(id);
        }
    }
    Ok(held)
}
