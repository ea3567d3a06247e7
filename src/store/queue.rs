//! The in-memory delivery queues, shared by every backend: the durable one rebuilds them
//! from disk at start and mirrors every change to disk.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::{PendingDelivery, QueueCounts};

/// Every subscription's queue.
#[derive(Default)]
pub struct Queues {
    queues: HashMap<String, Queue>,
    next_seq: u64,
}

#[derive(Default)]
struct Queue {
    /// Waiting deliveries by seq (enqueue order).
    waiting: BTreeMap<u64, PendingDelivery>,
    /// (not_before, seq) of every waiting delivery, for unordered take.
    by_time: BTreeSet<(jiff::Timestamp, u64)>,
    in_flight: HashMap<u64, PendingDelivery>,
    /// Dead letters by seq: the event and when it was given up (the rest is on disk).
    dead: BTreeMap<u64, Dead>,
}

/// The index entry of one dead letter.
#[derive(Debug, Clone)]
pub struct Dead {
    pub event_id: String,
    pub at: jiff::Timestamp,
}

impl Queue {
    fn insert(&mut self, d: PendingDelivery) {
        self.by_time.insert((d.not_before, d.seq));
        self.waiting.insert(d.seq, d);
    }
    fn remove_waiting(&mut self, seq: u64) -> Option<PendingDelivery> {
        let d = self.waiting.remove(&seq)?;
        self.by_time.remove(&(d.not_before, seq));
        Some(d)
    }
}

impl Queues {
    /// Takes the next sequence number for a delivery about to be stored.
    pub fn reserve_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq - 1
    }

    /// Queues `d` with the sequence number it already has (loading from disk).
    pub fn restore(&mut self, d: PendingDelivery) {
        self.next_seq = self.next_seq.max(d.seq + 1);
        self.queues.entry(d.subscription.clone()).or_default().insert(d);
    }

    pub fn restore_dead(&mut self, subscription: &str, seq: u64, dead: Dead) {
        self.next_seq = self.next_seq.max(seq + 1);
        self.queues
            .entry(subscription.to_string())
            .or_default()
            .dead
            .insert(seq, dead);
    }

    pub fn take_due(
        &mut self,
        subscription: &str,
        now: jiff::Timestamp,
        max: usize,
        ordered: bool,
    ) -> Vec<PendingDelivery> {
        let Some(q) = self.queues.get_mut(subscription) else {
            return vec![];
        };
        let seqs: Vec<u64> = if ordered {
            let mut blocked: HashSet<&str> = q.in_flight.values().filter_map(|d| d.ordering_key.as_deref()).collect();
            let mut picked = Vec::new();
            for d in q.waiting.values() {
                if picked.len() == max {
                    break;
                }
                let key = d.ordering_key.as_deref();
                if key.is_some_and(|k| blocked.contains(k)) {
                    continue;
                }
                if let Some(k) = key {
                    blocked.insert(k);
                }
                if d.not_before <= now {
                    picked.push(d.seq);
                }
            }
            picked
        } else {
            q.by_time
                .iter()
                .take_while(|(t, _)| *t <= now)
                .take(max)
                .map(|(_, s)| *s)
                .collect()
        };
        let mut taken = Vec::with_capacity(seqs.len());
        for seq in seqs {
            if let Some(d) = q.remove_waiting(seq) {
                q.in_flight.insert(seq, d.clone());
                taken.push(d);
            }
        }
        taken
    }

    pub fn next_due(&self, subscription: &str) -> Option<jiff::Timestamp> {
        self.queues.get(subscription)?.by_time.first().map(|(t, _)| *t)
    }

    pub fn complete(&mut self, d: &PendingDelivery) {
        if let Some(q) = self.queues.get_mut(&d.subscription) {
            q.in_flight.remove(&d.seq);
        }
    }

    pub fn retry(&mut self, d: PendingDelivery) {
        let q = self.queues.entry(d.subscription.clone()).or_default();
        q.in_flight.remove(&d.seq);
        q.insert(d);
    }

    /// Moves an in-flight (or waiting) delivery to the dead letters.
    pub fn dead_letter(&mut self, d: &PendingDelivery, at: jiff::Timestamp) {
        let q = self.queues.entry(d.subscription.clone()).or_default();
        if q.in_flight.remove(&d.seq).is_none() {
            q.remove_waiting(d.seq);
        }
        q.dead.insert(
            d.seq,
            Dead {
                event_id: d.event_id.clone(),
                at,
            },
        );
    }

    /// Waiting (not in flight) deliveries accepted before `cutoff`.
    pub fn waiting_accepted_before(&self, subscription: &str, cutoff: jiff::Timestamp) -> Vec<PendingDelivery> {
        self.queues
            .get(subscription)
            .map(|q| q.waiting.values().filter(|d| d.accepted_at < cutoff).cloned().collect())
            .unwrap_or_default()
    }

    /// Dead letters given up at or after `since` (with `newer`) or before it, by seq.
    pub fn dead(&self, subscription: &str, since: jiff::Timestamp, newer: bool) -> Vec<(u64, Dead)> {
        self.queues
            .get(subscription)
            .map(|q| {
                q.dead
                    .iter()
                    .filter(|(_, d)| (d.at >= since) == newer)
                    .map(|(s, d)| (*s, d.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes a dead letter from the index (replayed or purged).
    pub fn remove_dead(&mut self, subscription: &str, seq: u64) -> Option<Dead> {
        self.queues.get_mut(subscription)?.dead.remove(&seq)
    }

    /// Removes a subscription's queue; returns the deliveries and dead letters it held.
    pub fn forget(&mut self, subscription: &str) -> (Vec<PendingDelivery>, Vec<(u64, Dead)>) {
        self.queues
            .remove(subscription)
            .map(|q| {
                (
                    q.waiting.into_values().chain(q.in_flight.into_values()).collect(),
                    q.dead.into_iter().collect(),
                )
            })
            .unwrap_or_default()
    }

    /// Lets go of a subscription's waiting deliveries and dead letters (its shard moved to
    /// another replica); those in flight stay until they finish. Returns what was let go.
    pub fn release(&mut self, subscription: &str) -> (Vec<PendingDelivery>, Vec<(u64, Dead)>) {
        let Some(q) = self.queues.get_mut(subscription) else {
            return Default::default();
        };
        q.by_time.clear();
        let waiting = std::mem::take(&mut q.waiting).into_values().collect();
        let dead = std::mem::take(&mut q.dead).into_iter().collect();
        if q.in_flight.is_empty() {
            self.queues.remove(subscription);
        }
        (waiting, dead)
    }

    /// Whether `seq` of `subscription` is known (waiting or in flight).
    pub fn knows(&self, subscription: &str, seq: u64) -> bool {
        self.queues
            .get(subscription)
            .is_some_and(|q| q.waiting.contains_key(&seq) || q.in_flight.contains_key(&seq))
    }

    /// Whether `seq` is a dead letter of `subscription` here.
    pub fn knows_dead(&self, subscription: &str, seq: u64) -> bool {
        self.queues.get(subscription).is_some_and(|q| q.dead.contains_key(&seq))
    }

    /// Deliveries in flight over the subscriptions `pick` chooses.
    pub fn in_flight(&self, pick: impl Fn(&str) -> bool) -> usize {
        self.queues
            .iter()
            .filter(|(s, _)| pick(s))
            .map(|(_, q)| q.in_flight.len())
            .sum()
    }

    /// Every subscription with a queue or dead letters.
    pub fn subscriptions(&self) -> impl Iterator<Item = &str> {
        self.queues.keys().map(String::as_str)
    }

    /// Deliveries waiting or in flight, over every subscription.
    pub fn total_backlog(&self) -> u64 {
        self.queues
            .values()
            .map(|q| (q.waiting.len() + q.in_flight.len()) as u64)
            .sum()
    }

    pub fn counts(&self, subscription: &str) -> QueueCounts {
        self.queues
            .get(subscription)
            .map(|q| QueueCounts {
                backlog: (q.waiting.len() + q.in_flight.len()) as u64,
                in_flight: q.in_flight.len() as u64,
                dead_lettered: q.dead.len() as u64,
                ..Default::default()
            })
            .unwrap_or_default()
    }
}
