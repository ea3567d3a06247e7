//! The in-memory store: everything is lost on restart. The durable backend replaces it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Appended, PendingDelivery, QueueCounts, Store, StoreError};
use crate::event::MailboxEvent;

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    events: HashMap<String, Arc<MailboxEvent>>,
    producer_ids: HashMap<String, String>,
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
    dead: Vec<(PendingDelivery, String)>,
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

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        self.inner
            .lock()
            .map_err(|_| StoreError::Unavailable("memory store lock poisoned".into()))
    }
}

impl Store for MemoryStore {
    fn append(&self, events: Vec<MailboxEvent>) -> Result<Vec<Appended>, StoreError> {
        let mut inner = self.lock()?;
        Ok(events
            .into_iter()
            .map(|event| {
                if let Some(pid) = &event.producer_event_id {
                    if let Some(existing) = inner.producer_ids.get(pid) {
                        return Appended {
                            id: existing.clone(),
                            duplicate: true,
                        };
                    }
                    inner.producer_ids.insert(pid.clone(), event.id.clone());
                }
                let id = event.id.clone();
                inner.events.insert(id.clone(), Arc::new(event));
                Appended { id, duplicate: false }
            })
            .collect())
    }

    fn event(&self, id: &str) -> Result<Option<Arc<MailboxEvent>>, StoreError> {
        Ok(self.lock()?.events.get(id).cloned())
    }

    fn enqueue(&self, deliveries: Vec<PendingDelivery>) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        for mut d in deliveries {
            d.seq = inner.next_seq;
            inner.next_seq += 1;
            inner.queues.entry(d.subscription.clone()).or_default().insert(d);
        }
        Ok(())
    }

    fn take_due(
        &self,
        subscription: &str,
        now: jiff::Timestamp,
        max: usize,
        ordered: bool,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        let mut inner = self.lock()?;
        let Some(q) = inner.queues.get_mut(subscription) else {
            return Ok(vec![]);
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
        Ok(taken)
    }

    fn next_due(&self, subscription: &str) -> Option<jiff::Timestamp> {
        let inner = self.inner.lock().ok()?;
        inner.queues.get(subscription)?.by_time.first().map(|(t, _)| *t)
    }

    fn complete(&self, delivery: &PendingDelivery) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        if let Some(q) = inner.queues.get_mut(&delivery.subscription) {
            q.in_flight.remove(&delivery.seq);
        }
        Ok(())
    }

    fn retry(&self, delivery: PendingDelivery) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        let q = inner.queues.entry(delivery.subscription.clone()).or_default();
        q.in_flight.remove(&delivery.seq);
        q.insert(delivery);
        Ok(())
    }

    fn dead_letter(&self, delivery: PendingDelivery, reason: String) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        let q = inner.queues.entry(delivery.subscription.clone()).or_default();
        q.in_flight.remove(&delivery.seq);
        q.dead.push((delivery, reason));
        Ok(())
    }

    fn counts(&self, subscription: &str) -> QueueCounts {
        let Ok(inner) = self.inner.lock() else {
            return QueueCounts::default();
        };
        inner
            .queues
            .get(subscription)
            .map(|q| QueueCounts {
                backlog: (q.waiting.len() + q.in_flight.len()) as u64,
                dead_lettered: q.dead.len() as u64,
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(s).expect("valid")
    }

    fn pending(event: &str, key: Option<&str>, not_before: i64) -> PendingDelivery {
        PendingDelivery {
            subscription: "sub".into(),
            event_id: event.into(),
            attempts: 0,
            not_before: at(not_before),
            accepted_at: at(0),
            ordering_key: key.map(String::from),
            matched_filters: vec![],
            seq: 0,
        }
    }

    #[test]
    fn unordered_takes_due_in_time_order_and_counts_backlog() {
        let s = MemoryStore::new();
        s.enqueue(vec![
            pending("late", None, 50),
            pending("a", None, 10),
            pending("b", None, 5),
        ])
        .expect("enqueue");
        let taken = s.take_due("sub", at(20), 10, false).expect("take");
        assert_eq!(
            taken.iter().map(|d| d.event_id.as_str()).collect::<Vec<_>>(),
            vec!["b", "a"]
        );
        assert_eq!(s.counts("sub").backlog, 3, "in flight still counts");
        s.complete(&taken[0]).expect("complete");
        let mut again = taken[1].clone();
        again.not_before = at(30);
        s.retry(again).expect("retry");
        assert_eq!(s.next_due("sub"), Some(at(30)));
        assert_eq!(s.counts("sub").backlog, 2);
    }

    #[test]
    fn ordered_holds_back_later_events_of_a_busy_or_waiting_key() {
        let s = MemoryStore::new();
        s.enqueue(vec![
            pending("m1-first", Some("m1"), 100), // not due: holds m1 back
            pending("m1-second", Some("m1"), 0),
            pending("m2-first", Some("m2"), 0),
            pending("m2-second", Some("m2"), 0),
        ])
        .expect("enqueue");
        let taken = s.take_due("sub", at(10), 10, true).expect("take");
        assert_eq!(
            taken.iter().map(|d| d.event_id.as_str()).collect::<Vec<_>>(),
            vec!["m2-first"]
        );
        // m2-first in flight: m2-second waits for it.
        assert!(s.take_due("sub", at(10), 10, true).expect("take").is_empty());
        s.complete(&taken[0]).expect("complete");
        let next = s.take_due("sub", at(10), 10, true).expect("take");
        assert_eq!(next[0].event_id, "m2-second");
    }

    #[test]
    fn producer_ids_deduplicate() {
        let s = MemoryStore::new();
        let mut e: MailboxEvent = serde_json::from_value(serde_json::json!({
            "id": "evt_1", "type": "message.received", "occurredAt": "2026-01-01T00:00:00Z",
            "receivedAt": "2026-01-01T00:00:00Z", "source": "http", "mailbox": "a@b.c",
            "producerEventId": "p-1"
        }))
        .expect("event");
        let first = s.append(vec![e.clone()]).expect("append");
        e.id = "evt_2".into();
        let second = s.append(vec![e]).expect("append");
        assert_eq!(
            first[0],
            Appended {
                id: "evt_1".into(),
                duplicate: false
            }
        );
        assert_eq!(
            second[0],
            Appended {
                id: "evt_1".into(),
                duplicate: true
            }
        );
    }
}
