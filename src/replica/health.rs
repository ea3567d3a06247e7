//! Delivery health travels through the store: each replica publishes the health and queue
//! figures of the subscriptions on its shards (when they change, and every `REFRESH`),
//! and the leader's status writer reads every subscription's from there.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::delivery::Deliveries;
use crate::delivery::health::Published;

/// How often changes are published.
pub const PUBLISH: Duration = Duration::from_secs(1);
/// Published again unchanged this often, so the row shows a live owner.
const REFRESH: Duration = Duration::from_secs(15);

pub async fn run(deliveries: Arc<Deliveries>, identity: String, stop: CancellationToken) {
    let mut last: HashMap<String, (Published, Instant)> = HashMap::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(PUBLISH) => {}
        }
        let now = deliveries.published();
        let changed: Vec<(String, Published)> = now
            .into_iter()
            .filter(|(uid, p)| {
                last.get(uid)
                    .is_none_or(|(before, at)| before != p || at.elapsed() >= REFRESH)
            })
            .collect();
        if changed.is_empty() {
            continue;
        }
        let rows: Vec<(String, serde_json::Value)> = changed
            .iter()
            .filter_map(|(uid, p)| serde_json::to_value(p).ok().map(|v| (uid.clone(), v)))
            .collect();
        let (d, who) = (deliveries.clone(), identity.clone());
        let written = tokio::task::spawn_blocking(move || {
            d.backend()
                .sharing()
                .map(|s| s.publish_health(&who, rows))
                .unwrap_or(Ok(()))
        })
        .await;
        match written {
            Ok(Ok(())) => {
                let at = Instant::now();
                for (uid, p) in changed {
                    last.insert(uid, (p, at));
                }
            }
            Ok(Err(err)) => tracing::debug!(%err, "cannot publish delivery health; will retry"),
            Err(err) => tracing::warn!(%err, "publishing delivery health stopped unexpectedly"),
        }
    }
}
