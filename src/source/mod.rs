//! Sources turn input into `MailboxEvent`s and hand them to the pipeline, which stores
//! them, routes them and queues their deliveries before the source answers. Inbound
//! adapters: they depend on the core (`store`, `route`, `delivery`, `event`, `api`), `auth`
//! and the shared `handles`, never on another adapter (admin, history, controller).

pub mod dovecot;
pub mod http;
pub mod journal;
pub mod seen;
pub mod smtp;

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::api::Direction;
use crate::delivery::Deliveries;
use crate::event::{MailboxEvent, domain_of};
use crate::handles::Heard;
use crate::metrics::Metrics;
use crate::route::Router;
use crate::store::{Appended, Ingest, RawMessage, RowWrite, StoreError};

/// Store → route → enqueue, shared by every source.
pub struct Pipeline {
    pub deliveries: Arc<Deliveries>,
    pub router: Arc<Router>,
    pub metrics: Metrics,
    /// Lower-cased domains that count as internal for direction.
    pub internal_domains: Vec<String>,
    /// Per-filter match counters, read by the status writer.
    pub matches: Arc<crate::handles::MatchCounters>,
    /// When each source and producer last had events committed (`seen`).
    pub activity: Arc<crate::handles::SourceActivity>,
    pub limits: Limits,
}

/// Why the pipeline did not take a set of events; nothing of it was stored.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Routing panicked on one event: a bug in mailhook, not in the input. It is counted in
    /// `mailhook_panics_total{component="route"}`; other requests are unaffected.
    #[error("{} while routing event {} of the request", crate::panics::ANSWER, .index + 1)]
    RoutingPanicked { index: usize },
}

/// The `--internal-domains` as direction compares them: trimmed, lower-case.
pub fn internal_domains(flags: &[String]) -> Vec<String> {
    flags
        .iter()
        .map(|d| d.trim().to_lowercase())
        .filter(|d| !d.is_empty())
        .collect()
}

/// A raw message on its way to the archive, and whether it is there already: the events of
/// a large message are committed in chunks, and the message is written once.
#[derive(Debug)]
pub struct RawArchive {
    message: Option<RawMessage>,
    archived: bool,
    /// (SHA-256, size) of the message: a later chunk's events that refer to it add their
    /// mailboxes to its index.
    named: Option<(String, usize)>,
}

impl RawArchive {
    pub fn new(message: Option<RawMessage>) -> RawArchive {
        let named = message.as_ref().map(|m| (m.sha256.clone(), m.bytes.len()));
        RawArchive {
            message,
            archived: false,
            named,
        }
    }
}

/// When sources refuse new events instead of letting the store's volume fill. A
/// subscription's backlog never refuses anything: past its `delivery.maxBacklog` the store
/// dead-letters that subscription's new deliveries.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// Most bytes the store may occupy on disk.
    pub max_store_bytes: Option<u64>,
}

impl Pipeline {
    /// Why the store cannot take new events right now (its commits fail), if it cannot.
    pub fn store_down(&self) -> Option<String> {
        self.deliveries.backend().unavailable()
    }

    /// Whether the store's commits fail for want of space (a full volume): answered as
    /// such (HTTP 507, SMTP 452) rather than as an outage.
    pub fn out_of_space(reason: &str) -> bool {
        crate::store::out_of_space(reason)
    }

    /// Why new events are refused right now, if they are.
    pub fn overloaded(&self) -> Option<String> {
        let store = self.deliveries.backend();
        if let (Some(max), Some(bytes)) = (self.limits.max_store_bytes, store.disk_bytes())
            && bytes >= max
        {
            return Some(format!(
                "the store ({bytes} bytes) is at its limit (--max-store-bytes {max})"
            ));
        }
        None
    }
}

impl Pipeline {
    /// Routes `events`, then stores them with their deliveries in one durable write, then
    /// wakes the shards. Blocks until the write is durable: call it off the async runtime.
    pub fn accept(&self, events: Vec<MailboxEvent>) -> Result<Vec<Appended>, AcceptError> {
        self.accept_archived(events, None)
    }

    /// As `accept`, for events made from one raw message (they refer to it by its
    /// SHA-256): the message is archived in the same write when a subscription that gets
    /// one of the events asks for raw message links (none does while the archive is off),
    /// and otherwise not kept at all.
    pub fn accept_archived(
        &self,
        events: Vec<MailboxEvent>,
        raw: Option<RawMessage>,
    ) -> Result<Vec<Appended>, AcceptError> {
        self.accept_with(events, &mut RawArchive::new(raw), Vec::new())
    }

    /// As `accept_archived`, for one of several chunks of events made from one message:
    /// the message is written once, with the first chunk that needs it, and the later
    /// chunks refer to it.
    pub fn accept_chunk(
        &self,
        events: Vec<MailboxEvent>,
        archive: &mut RawArchive,
    ) -> Result<Vec<Appended>, AcceptError> {
        self.accept_with(events, archive, Vec::new())
    }

    /// As `accept`, writing the source's keyed `rows` in the same commit.
    pub fn accept_with_rows(
        &self,
        events: Vec<MailboxEvent>,
        rows: Vec<RowWrite>,
    ) -> Result<Vec<Appended>, AcceptError> {
        self.accept_with(events, &mut RawArchive::new(None), rows)
    }

    fn accept_with(
        &self,
        events: Vec<MailboxEvent>,
        raw: &mut RawArchive,
        rows: Vec<RowWrite>,
    ) -> Result<Vec<Appended>, AcceptError> {
        let table = self.router.current();
        // Routing is pure CPU over user-supplied strings: a panic there is a bug, and must
        // fail this request only (the listener and other requests go on).
        let route = |index: usize, event: &MailboxEvent| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| table.route(event))).map_err(|_| {
                crate::panics::record(&self.metrics, "route");
                AcceptError::RoutingPanicked { index }
            })
        };
        let heard = self.producers(&events);
        let mut items = Vec::with_capacity(events.len());
        // Per source event: its index in `items`, the filters it matched, whether anyone gets it.
        let mut routing = Vec::with_capacity(events.len());
        for (index, event) in events.into_iter().enumerate() {
            let routed = route(index, &event)?;
            routing.push((
                items.len(),
                routed.matched,
                !routed.targets.is_empty(),
                event.source,
                event.received_at,
            ));
            let deliveries = Deliveries::pending_for(&event, &routed.targets);
            items.push(Ingest { event, deliveries });
            for flagged in routed.flagged {
                let derived = route(index, &flagged)?;
                let deliveries = Deliveries::pending_for(&flagged, &derived.targets);
                items.push(Ingest {
                    event: flagged,
                    deliveries,
                });
            }
        }
        // One wake per subscription, not per delivery.
        let woken: BTreeSet<String> = items
            .iter()
            .flat_map(|i| i.deliveries.iter().map(|d| d.subscription.as_str()))
            .collect::<BTreeSet<&str>>()
            .into_iter()
            .map(String::from)
            .collect();
        // Archived only for a subscription that will get a link to it (one that asks, under
        // a grant that allows raw messages of the event), or for a LegalHold that holds
        // the event's mailbox (whether or not anyone gets the event).
        // Ingest opens once the holds are known; were they not, none would be archived for.
        let holds = self.router.holds().unwrap_or_default();
        let now = jiff::Timestamp::now();
        let wants = (raw.message.is_some() || raw.archived)
            && items.iter().any(|i| {
                i.deliveries.iter().any(|d| {
                    self.deliveries
                        .links_raw_message(&d.subscription, &i.event, table.grants())
                }) || (!holds.is_empty() && holds.holding(&i.event.mailbox, now).next().is_some())
            });
        let wanted = if wants { raw.message.take() } else { None };
        // Events refer to the message only where it is (or is now being) archived.
        if !wants {
            for item in &mut items {
                item.event.raw_message = None;
            }
        }
        let store = self.deliveries.events();
        let archiving = wanted.is_some();
        // A later chunk of a message archived with an earlier one: its events' mailboxes
        // join the message's index (what LegalHolds find it by).
        let mut rows = rows;
        if wants
            && wanted.is_none()
            && raw.archived
            && let Some((sha256, size)) = &raw.named
        {
            let mailboxes: Vec<String> = items
                .iter()
                .filter(|i| i.event.raw_message.is_some())
                .map(|i| i.event.mailbox.clone())
                .collect();
            rows.extend(crate::store::hold::raw_index_rows(
                sha256,
                *size,
                now.as_second(),
                &mailboxes,
            ));
        }
        let stored = if rows.is_empty() {
            store.ingest_archived(items, wanted)?
        } else {
            store.ingest_with_rows(items, rows)?
        };
        raw.archived |= archiving;
        let now = jiff::Timestamp::now().as_second();
        heard.0.iter().chain(&heard.1).for_each(|h| h.heard(now));

        let mut answers = Vec::with_capacity(routing.len());
        for (index, matched, any, source, at) in routing {
            let outcome = stored[index].clone();
            if outcome.duplicate {
                self.metrics
                    .events_ingested
                    .with_label_values(&[source.as_str(), "duplicate"])
                    .inc();
            } else {
                self.metrics
                    .events_ingested
                    .with_label_values(&[source.as_str(), "accepted"])
                    .inc();
                self.metrics
                    .events_routed
                    .with_label_values(&[if any { "matched" } else { "unmatched" }])
                    .inc();
                self.matches.record(&matched, at);
            }
            answers.push(outcome);
        }
        self.deliveries.wake(woken.iter().map(String::as_str));
        Ok(answers)
    }
}

impl Pipeline {
    /// A producer was heard from outside `accept` (a Dovecot request acknowledged, with or
    /// without events to store: an idle mailbox server still reports).
    pub fn heard_from(&self, source: crate::event::Source, producer: &str) {
        self.activity
            .producer(source.as_str(), producer)
            .heard(jiff::Timestamp::now().as_second());
    }

    /// The producers of `events`, looked up once per run of events from the same one (a
    /// batch has one): the first apart, so that the usual batch allocates nothing.
    fn producers(&self, events: &[MailboxEvent]) -> (Option<Arc<Heard>>, Vec<Arc<Heard>>) {
        let (mut first, mut more): (Option<Arc<Heard>>, Vec<Arc<Heard>>) = (None, Vec::new());
        let mut previous = None;
        for producer in events.iter().filter_map(seen::producer_of) {
            if previous == Some(producer) {
                continue;
            }
            previous = Some(producer);
            let heard = self.activity.producer(producer.0, producer.1);
            let known = |h: &Arc<Heard>| Arc::ptr_eq(h, &heard);
            if first.as_ref().is_some_and(known) || more.iter().any(known) {
                continue;
            }
            match first {
                None => first = Some(heard),
                Some(_) => more.push(heard),
            }
        }
        (first, more)
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

/// Whether `address` is in one of the `internal` domains or their subdomains.
pub fn is_internal(address: &str, internal: &[String]) -> bool {
    domain_of(address).is_some_and(|d| internal.iter().any(|i| d == i || d.ends_with(&format!(".{i}"))))
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
    let from_internal = from.is_some_and(|a| is_internal(a, internal));
    let all_internal = recipients.into_iter().all(|a| is_internal(a, internal));
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
