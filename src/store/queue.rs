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
    dead: u64,
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

    /// Gives `d` the next sequence number and queues it.
    pub fn push(&mut self, mut d: PendingDelivery) -> u64 {
        d.seq = self.next_seq;
        self.next_seq += 1;
        let seq = d.seq;
        self.queues.entry(d.subscription.clone()).or_default().insert(d);
        seq
    }

    /// Queues `d` with the sequence number it already has (loading from disk).
    pub fn restore(&mut self, d: PendingDelivery) {
        self.next_seq = self.next_seq.max(d.seq + 1);
        self.queues.entry(d.subscription.clone()).or_default().insert(d);
    }

    pub fn restore_dead(&mut self, subscription: &str, seq: u64) {
        self.next_seq = self.next_seq.max(seq + 1);
        self.queues.entry(subscription.to_string()).or_default().dead += 1;
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

    pub fn dead_letter(&mut self, d: &PendingDelivery) {
        let q = self.queues.entry(d.subscription.clone()).or_default();
        q.in_flight.remove(&d.seq);
        q.dead += 1;
    }

    /// Removes a subscription's queue; returns the deliveries it held.
    pub fn forget(&mut self, subscription: &str) -> Vec<PendingDelivery> {
        self.queues
            .remove(subscription)
            .map(|q| q.waiting.into_values().chain(q.in_flight.into_values()).collect())
            .unwrap_or_default()
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
                dead_lettered: q.dead,
            })
            .unwrap_or_default()
    }
}
