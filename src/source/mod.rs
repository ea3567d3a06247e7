//! Sources turn input into `MailboxEvent`s and hand them to the pipeline, which stores
//! them, routes them and queues their deliveries before the source answers.

pub mod http;

use std::sync::Arc;

use crate::api::Direction;
use crate::delivery::Deliveries;
use crate::event::{MailboxEvent, domain_of};
use crate::metrics::Metrics;
use crate::route::Router;
use crate::store::{Appended, StoreError};

/// Store → route → enqueue, shared by every source.
pub struct Pipeline {
    pub deliveries: Arc<Deliveries>,
    pub router: Arc<Router>,
    pub metrics: Metrics,
    /// Lower-cased domains that count as internal for direction.
    pub internal_domains: Vec<String>,
    /// Per-filter match counters, read by the status writer.
    pub matches: Arc<crate::controller::MatchCounters>,
}

impl Pipeline {
    /// Stores `events`, routes the new ones and queues their deliveries. Returns once
    /// every delivery is queued.
    pub fn accept(&self, events: Vec<MailboxEvent>) -> Result<Vec<Appended>, StoreError> {
        let store = self.deliveries.store();
        let by_id: Vec<MailboxEvent> = events.clone();
        let appended = store.append(events)?;
        let table = self.router.current();
        for (event, outcome) in by_id.iter().zip(&appended) {
            let source = event.source.as_str();
            if outcome.duplicate {
                self.metrics
                    .events_ingested
                    .with_label_values(&[source, "duplicate"])
                    .inc();
                continue;
            }
            self.metrics
                .events_ingested
                .with_label_values(&[source, "accepted"])
                .inc();
            let routed = table.route(event);
            self.matches.record(&routed.matched, event.received_at);
            self.metrics
                .events_routed
                .with_label_values(&[if routed.targets.is_empty() {
                    "unmatched"
                } else {
                    "matched"
                }])
                .inc();
            self.deliveries.enqueue(event, &routed.targets)?;
            for flagged in routed.flagged {
                let derived = table.route(&flagged);
                store.append(vec![flagged.clone()])?;
                self.deliveries.enqueue(&flagged, &derived.targets)?;
            }
        }
        Ok(appended)
    }
}

/// Lower-cases and checks an address: one `@`, something on each side, no spaces.
pub fn normalize_address(value: &str) -> Option<String> {
    let v = value.trim();
    let (local, domain) = v.rsplit_once('@')?;
    let ok = !local.is_empty()
        && !domain.is_empty()
        && domain.contains('.') | (domain == "localhost")
        && v.len() <= 320
        && !v
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>');
    ok.then(|| v.to_lowercase())
}

/// Direction from the internal domains: internal sender and recipients → internal,
/// internal sender → outbound, otherwise inbound. None when nothing is configured.
pub fn direction<'a>(
    from: Option<&str>,
    recipients: impl Iterator<Item = &'a str>,
    internal: &[String],
) -> Option<Direction> {
    if internal.is_empty() {
        return None;
    }
    let is_internal =
        |a: &str| domain_of(a).is_some_and(|d| internal.iter().any(|i| d == i || d.ends_with(&format!(".{i}"))));
    let from_internal = from.is_some_and(is_internal);
    let all_internal = recipients.into_iter().all(is_internal);
    Some(match (from_internal, all_internal) {
        (true, true) => Direction::Internal,
        (true, false) => Direction::Outbound,
        _ => Direction::Inbound,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked_and_lowered() {
        assert_eq!(
            normalize_address(" Alice@Example.COM "),
            Some("alice@example.com".into())
        );
        for bad in ["alice", "@example.com", "alice@", "a b@example.com", "<a@example.com>"] {
            assert_eq!(normalize_address(bad), None, "{bad}");
        }
    }

    #[test]
    fn direction_from_internal_domains() {
        let internal = vec!["example.com".to_string()];
        let d = |from: &str, to: &[&str]| direction(Some(from), to.iter().copied(), &internal);
        assert_eq!(d("a@example.com", &["b@mail.example.com"]), Some(Direction::Internal));
        assert_eq!(
            d("a@example.com", &["b@example.com", "x@other.org"]),
            Some(Direction::Outbound)
        );
        assert_eq!(d("x@other.org", &["a@example.com"]), Some(Direction::Inbound));
        assert_eq!(direction(Some("a@b.c"), std::iter::empty(), &[]), None);
    }
}
