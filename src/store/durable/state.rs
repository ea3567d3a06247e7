//! The in-memory side of the store: the delivery queues, the parsed-event cache, the
//! producer ids and the reference counts that decide when an event leaves the disk, and
//! how it is rebuilt from the tables at start. Depends on `schema` (to read and encode)
//! and on `committer` only for the `Op`s it hands back; never writes to disk itself.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::committer::Op;
use super::engine::Loaded;
use super::schema::{StoredDelivery, io, json};
use crate::event::MailboxEvent;
use crate::store::queue::{Dead, Queues};
use crate::store::{PendingDelivery, StoreError};

/// What refers to one stored event.
#[derive(Default, Clone, Copy)]
struct Refs {
    pending: u32,
    dead: u32,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) queues: Queues,
    /// Parsed events that still have pending deliveries (bounded by `store::event_cache`): fan-out
    /// and retries do not re-read and re-parse them.
    pub(super) cache: HashMap<String, Arc<MailboxEvent>>,
    pub(super) producer_ids: HashMap<String, String>,
    /// Producer ids in the order first seen (the order they expire in).
    pub(super) producer_order: VecDeque<(jiff::Timestamp, String)>,
    refs: HashMap<String, Refs>,
    /// Attempts logged per subscription.
    pub(super) attempts: HashMap<String, u64>,
    /// Key of the last attempt logged: keys only grow.
    last_attempt_key: u64,
    /// Namespace of each subscription noted (SUBSCRIPTIONS).
    pub(super) namespaces: HashMap<String, String>,
    /// Each subscription's cap on its backlog, when it has one.
    pub(super) caps: HashMap<String, crate::store::BacklogCap>,
}

/// Which reference to an event went away.
#[derive(Clone, Copy)]
pub(super) enum Ref {
    Pending,
    Dead,
}

impl State {
    /// One reference to `event_id` is gone. Returns true when it was the last, so the
    /// event leaves the disk. The cache lets go with the last pending delivery.
    pub(super) fn release(&mut self, event_id: &str, which: Ref) -> bool {
        let Some(r) = self.refs.get_mut(event_id) else {
            return false;
        };
        match which {
            Ref::Pending => r.pending = r.pending.saturating_sub(1),
            Ref::Dead => r.dead = r.dead.saturating_sub(1),
        }
        let r = *r;
        if r.pending == 0 {
            self.cache.remove(event_id);
        }
        if r.pending == 0 && r.dead == 0 {
            self.refs.remove(event_id);
            return true;
        }
        false
    }

    pub(super) fn hold(&mut self, event_id: &str, which: Ref) {
        let r = self.refs.entry(event_id.to_string()).or_default();
        match which {
            Ref::Pending => r.pending += 1,
            Ref::Dead => r.dead += 1,
        }
    }

    /// Whether a delivery or dead letter refers to the event.
    pub(super) fn holds(&self, event_id: &str) -> bool {
        self.refs.contains_key(event_id)
    }

    /// A subscription's attempt log as loaded when its shard was taken over.
    pub(super) fn note_attempts(&mut self, subscription: String, n: u64, newest: u64) {
        self.attempts.insert(subscription, n);
        self.last_attempt_key = self.last_attempt_key.max(newest);
    }

    pub(super) fn attempt_key(&mut self, at: jiff::Timestamp) -> u64 {
        let nanos = super::schema::nanos(at);
        self.last_attempt_key = nanos.max(self.last_attempt_key + 1);
        self.last_attempt_key
    }
}

/// The disk writes that make `deliveries` dead letters.
pub(super) fn dead_ops(
    deliveries: &[PendingDelivery],
    reason: &str,
    now: jiff::Timestamp,
) -> Result<Vec<Op>, StoreError> {
    let mut ops = Vec::with_capacity(deliveries.len() * 2);
    for d in deliveries {
        let mut stored = StoredDelivery::from(d);
        stored.reason = Some(reason.to_string());
        stored.dead_at = Some(now);
        ops.push(Op::DeletePending(d.seq));
        ops.push(Op::PutDead(d.seq, json(&stored)?));
    }
    Ok(ops)
}

/// The in-memory side of `dead_ops`.
pub(super) fn bury_in(state: &mut State, deliveries: &[PendingDelivery], now: jiff::Timestamp) {
    for d in deliveries {
        state.queues.dead_letter(d, now);
        state.hold(&d.event_id, Ref::Dead);
        state.release(&d.event_id, Ref::Pending);
    }
}

/// Rebuilds the in-memory indexes from the tables.
pub(super) fn build(loaded: Loaded) -> Result<State, StoreError> {
    let mut state = State::default();
    for (seq, bytes) in loaded.pending {
        let stored: StoredDelivery = serde_json::from_slice(&bytes).map_err(io)?;
        state.hold(&stored.event_id, Ref::Pending);
        state.queues.restore(stored.into_pending(seq));
    }
    for (seq, bytes) in loaded.dead {
        let stored: StoredDelivery = serde_json::from_slice(&bytes).map_err(io)?;
        state.hold(&stored.event_id, Ref::Dead);
        let dead = Dead {
            at: stored.dead_at.unwrap_or(stored.not_before),
            event_id: stored.event_id,
        };
        state.queues.restore_dead(&stored.subscription, seq, dead);
    }
    let mut producers = Vec::new();
    for (producer, event, at) in loaded.producers {
        let at = jiff::Timestamp::from_second(at).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        state.producer_ids.insert(producer.clone(), event);
        producers.push((at, producer));
    }
    producers.sort();
    state.producer_order = producers.into();
    for (uid, namespace) in loaded.subscriptions {
        state.namespaces.insert(uid, namespace);
    }
    for (subscription, at) in loaded.attempt_keys {
        *state.attempts.entry(subscription).or_default() += 1;
        state.last_attempt_key = state.last_attempt_key.max(at);
    }
    Ok(state)
}
