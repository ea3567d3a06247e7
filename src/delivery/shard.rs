//! A shard: the subscriptions that hash to it and the loop that takes their due
//! deliveries and spawns one `attempt::deliver` per free slot. Depends on the registry
//! (`super::Deliveries`, the store behind it) and `attempt`; owns no policy of its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::DefaultDirectRateLimiter;
use tokio::sync::{Notify, Semaphore};
use tracing::warn;

use super::health::Health;
use super::{Deliveries, DeliveryConfig, attempt::deliver};

pub(super) struct Subscription {
    pub(super) config: Arc<DeliveryConfig>,
    /// `config.url`, parsed once.
    pub(super) url: reqwest::Url,
    /// Metric series of a 2xx delivery, resolved once.
    pub(super) success: (prometheus::IntCounter, prometheus::Histogram),
    pub(super) slots: Arc<Semaphore>,
    pub(super) limiter: Option<Arc<DefaultDirectRateLimiter>>,
    pub(super) health: Arc<Health>,
}

#[derive(Default)]
pub(super) struct Shard {
    pub(super) subscriptions: Mutex<HashMap<String, Arc<Subscription>>>,
    pub(super) wake: Notify,
}

pub(super) async fn run_shard(deliveries: Arc<Deliveries>, shard: Arc<Shard>) {
    loop {
        let subs: Vec<Arc<Subscription>> = match shard.subscriptions.lock() {
            Ok(s) => s.values().cloned().collect(),
            Err(_) => return,
        };
        let now = jiff::Timestamp::now();
        let mut wake_at = now + Duration::from_secs(1);
        for sub in subs {
            let config = &sub.config;
            if config.paused || sub.health.is_disabled() {
                continue;
            }
            let free = sub.slots.available_permits();
            if free > 0 {
                match deliveries.store.take_due(&config.uid, now, free, config.ordered) {
                    Ok(batch) => {
                        for d in batch {
                            let Ok(permit) = sub.slots.clone().try_acquire_owned() else {
                                break;
                            };
                            tokio::spawn(deliver(deliveries.clone(), shard.clone(), sub.clone(), d, permit));
                        }
                    }
                    Err(err) => {
                        warn!(%err, subscription = config.name, "cannot read the delivery queue")
                    }
                }
            }
            if let Some(due) = deliveries.store.next_due(&config.uid) {
                // A due delivery that is held back (ordering, no free slot) is retried
                // when a delivery finishes, or after a short pause.
                wake_at = wake_at.min(due.max(now + Duration::from_millis(100)));
            }
        }
        let sleep = Duration::try_from(wake_at.duration_since(jiff::Timestamp::now())).unwrap_or(Duration::ZERO);
        tokio::select! {
            () = shard.wake.notified() => {}
            () = tokio::time::sleep(sleep) => {}
        }
    }
}
