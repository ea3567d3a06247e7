//! The in-memory store: everything is lost on restart. For tests and for users who accept
//! that; the durable store is the default.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::queue::Queues;
use super::{Appended, Durable, Ingest, PendingDelivery, QueueCounts, Store, StoreError};
use crate::event::MailboxEvent;

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    events: HashMap<String, Arc<MailboxEvent>>,
    producer_ids: HashMap<String, String>,
    queues: Queues,
    dead: Vec<(PendingDelivery, String)>,
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
    fn ingest(&self, items: Vec<Ingest>) -> Result<Vec<Appended>, StoreError> {
        let mut inner = self.lock()?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            if let Some(pid) = &item.event.producer_event_id {
                if let Some(existing) = inner.producer_ids.get(pid) {
                    out.push(Appended {
                        id: existing.clone(),
                        duplicate: true,
                    });
                    continue;
                }
                inner.producer_ids.insert(pid.clone(), item.event.id.clone());
            }
            let id = item.event.id.clone();
            for d in item.deliveries {
                inner.queues.push(d);
            }
            inner.events.insert(id.clone(), Arc::new(item.event));
            out.push(Appended { id, duplicate: false });
        }
        Ok(out)
    }

    fn event(&self, id: &str) -> Result<Option<Arc<MailboxEvent>>, StoreError> {
        Ok(self.lock()?.events.get(id).cloned())
    }

    fn take_due(
        &self,
        subscription: &str,
        now: jiff::Timestamp,
        max: usize,
        ordered: bool,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        Ok(self.lock()?.queues.take_due(subscription, now, max, ordered))
    }

    fn next_due(&self, subscription: &str) -> Option<jiff::Timestamp> {
        self.inner.lock().ok()?.queues.next_due(subscription)
    }

    fn complete(&self, delivery: &PendingDelivery) -> Result<Durable, StoreError> {
        self.lock()?.queues.complete(delivery);
        Ok(Durable::now())
    }

    fn retry(&self, delivery: PendingDelivery) -> Result<(), StoreError> {
        self.lock()?.queues.retry(delivery);
        Ok(())
    }

    fn dead_letter(&self, delivery: PendingDelivery, reason: String) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        inner.queues.dead_letter(&delivery);
        inner.dead.push((delivery, reason));
        Ok(())
    }

    fn forget_subscription(&self, subscription: &str) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        inner.queues.forget(subscription);
        inner.dead.retain(|(d, _)| d.subscription != subscription);
        Ok(())
    }

    fn total_backlog(&self) -> u64 {
        self.inner.lock().map(|s| s.queues.total_backlog()).unwrap_or(0)
    }

    fn counts(&self, subscription: &str) -> QueueCounts {
        self.inner
            .lock()
            .map(|i| i.queues.counts(subscription))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn conforms() {
        super::super::conformance::run(&|| Box::new(super::MemoryStore::new()));
    }
}
