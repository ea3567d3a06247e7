//! The Prometheus registry and the metrics the operator exposes on `/metrics`. Label
//! values are bounded by the number of subscriptions: never an event, message or address.
//! Depends on nothing else of the crate.

use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric of the process, registered in one registry. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub events_ingested: IntCounterVec,
    pub events_routed: IntCounterVec,
    /// Unix seconds of each source's (and producer's) last committed events; a feed that
    /// goes silent shows here first (`MailhookSourceSilent`).
    pub source_last_event: IntGaugeVec,
    deliveries: IntCounterVec,
    delivery_duration: HistogramVec,
    pub backlog: IntGaugeVec,
    pub backlog_bytes: IntGaugeVec,
    pub backlog_oldest_age: IntGaugeVec,
    /// 1 while the subscription's backlog is at its cap (status: Healthy=False/BacklogFull).
    pub backlog_full: IntGaugeVec,
    pub backlog_overflowed: IntCounterVec,
    pub dead_letters: IntGaugeVec,
    pub endpoint_up: IntGaugeVec,
    pub endpoint_disabled: IntGaugeVec,
    pub store_disk_bytes: prometheus::IntGauge,
    /// The store's volume: size and bytes available (embedded store only).
    pub store_volume_bytes: prometheus::IntGauge,
    pub store_volume_available_bytes: prometheus::IntGauge,
    /// Queued deliveries read from the store since start (paged queues only).
    pub store_queue_rows_read: prometheus::IntCounter,
    /// Which store runs: `redb`, `memory` or `postgres` (the value is 1).
    pub store_kind: IntGaugeVec,
    pub store_up: prometheus::IntGauge,
    /// Deliveries waiting or in flight over every subscription the store holds, including
    /// any not (or no longer) known to the controllers.
    pub store_backlog: prometheus::IntGauge,
    pub ready: prometheus::IntGauge,
    pub store_purged: IntCounterVec,
    pub replayed: IntCounterVec,
    /// Deliveries withheld at send time because no MailboxGrant covers their event any more.
    pub not_granted: IntCounterVec,
    pub reconcile_duration: HistogramVec,
    pub reconcile_errors: IntCounterVec,
    /// Panics caught on the data path, by component; each is a bug to report.
    pub panics: IntCounterVec,
    /// Connections and requests turned away by a listener's bounds.
    pub refused: IntCounterVec,
    /// Store writes that failed, by operation.
    pub store_errors: IntCounterVec,
    /// Status writes to the apiserver, by kind and outcome.
    pub status_writes: IntCounterVec,
    /// Rebuilds of the routing table (many changes at once cost one).
    pub route_rebuilds: prometheus::IntCounter,
    /// Shared store: 1 for each shard this replica owns.
    pub shard_owned: IntGaugeVec,
    /// Shared store: shards taken, given back or lost (connection gone), by this replica.
    pub shard_handovers: IntCounterVec,
    /// 1 while this replica holds the leader Lease (writes status, runs store-wide housekeeping).
    pub leader: prometheus::IntGauge,
    pub leader_transitions: prometheus::IntCounter,
    /// Shared store: writes the database refused because their shard's claim had moved on.
    pub fenced_writes: prometheus::IntCounter,
    /// Leaves in the audit log, as the last checkpoint pass read it.
    pub audit_log_size: IntGauge,
    /// The size of the newest signed checkpoint of the audit log.
    pub audit_checkpoint_size: IntGauge,
    /// Checkpoint passes that could not sign (the log no longer extends the last
    /// checkpoint, or the store failed).
    pub audit_checkpoint_failures: IntCounter,
    /// Records past their retention that a LegalHold kept from this replica's last round
    /// of purges, by hold and kind.
    pub legal_hold_kept: IntGaugeVec,
    /// Dead-lettered events copied to the subscription's dead-letter sink, by outcome.
    pub dead_letter_forwards: IntCounterVec,
    /// Delivery requests in flight over every subscription, and the process-wide cap on them.
    pub requests_in_flight: prometheus::IntGauge,
    pub requests_in_flight_limit: prometheus::IntGauge,
}

const SUBSCRIPTION: &[&str] = &["namespace", "subscription"];

impl Metrics {
    /// Makes every metric in a registry of its own, group by group (the functions below).
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registrar(Registry::new());
        let panics = process(&r)?;
        let Ingest {
            events_ingested,
            events_routed,
            source_last_event,
            refused,
        } = ingest(&r)?;
        let Delivery {
            deliveries,
            delivery_duration,
            endpoint_up,
            endpoint_disabled,
            replayed,
            not_granted,
            dead_letter_forwards,
            requests_in_flight,
            requests_in_flight_limit,
        } = delivery(&r)?;
        let Backlog {
            backlog,
            backlog_bytes,
            backlog_oldest_age,
            backlog_full,
            backlog_overflowed,
            dead_letters,
        } = backlog(&r)?;
        let Store {
            store_disk_bytes,
            store_volume_bytes,
            store_volume_available_bytes,
            store_queue_rows_read,
            store_kind,
            store_up,
            store_backlog,
            store_purged,
            store_errors,
        } = store(&r)?;
        let Controller {
            ready,
            reconcile_duration,
            reconcile_errors,
            status_writes,
            route_rebuilds,
        } = controller(&r)?;
        let Replicas {
            shard_owned,
            shard_handovers,
            leader,
            leader_transitions,
            fenced_writes,
        } = replicas(&r)?;
        let (audit_log_size, audit_checkpoint_size, audit_checkpoint_failures) = audit(&r)?;
        let legal_hold_kept = r.gauge_vec(
            "mailhook_legal_hold_kept",
            "Records past their retention that a LegalHold kept from this replica's last round of purges (kind: raw_message, raw_message_bytes, attempt, dead_letter).",
            &["hold", "kind"],
        )?;
        Ok(Metrics {
            registry: r.0,
            events_ingested,
            events_routed,
            source_last_event,
            deliveries,
            delivery_duration,
            backlog,
            backlog_bytes,
            backlog_oldest_age,
            backlog_full,
            backlog_overflowed,
            dead_letters,
            endpoint_up,
            endpoint_disabled,
            store_disk_bytes,
            store_volume_bytes,
            store_volume_available_bytes,
            store_queue_rows_read,
            store_kind,
            store_up,
            store_backlog,
            ready,
            store_purged,
            replayed,
            not_granted,
            reconcile_duration,
            reconcile_errors,
            panics,
            refused,
            store_errors,
            status_writes,
            route_rebuilds,
            shard_owned,
            shard_handovers,
            leader,
            leader_transitions,
            fenced_writes,
            audit_log_size,
            audit_checkpoint_size,
            audit_checkpoint_failures,
            legal_hold_kept,
            dead_letter_forwards,
            requests_in_flight,
            requests_in_flight_limit,
        })
    }

    /// The series a successful delivery updates, resolved once per subscription (label
    /// lookups hash every label on every call).
    pub fn success_series(
        &self,
        namespace: &str,
        subscription: &str,
    ) -> (prometheus::IntCounter, prometheus::Histogram) {
        (
            self.deliveries
                .with_label_values(&[namespace, subscription, "success", "2xx"]),
            self.delivery_duration.with_label_values(&[namespace, subscription]),
        )
    }

    pub fn delivery(&self, namespace: &str, subscription: &str, outcome: &str, status_class: &str, took: Duration) {
        self.deliveries
            .with_label_values(&[namespace, subscription, outcome, status_class])
            .inc();
        self.delivery_duration
            .with_label_values(&[namespace, subscription])
            .observe(took.as_secs_f64());
    }

    /// Drops the series of a deleted subscription, so cardinality follows the resources.
    pub fn forget_subscription(&self, namespace: &str, subscription: &str) {
        let labels = [namespace, subscription];
        for g in [
            &self.backlog,
            &self.backlog_bytes,
            &self.backlog_oldest_age,
            &self.backlog_full,
            &self.dead_letters,
            &self.endpoint_up,
            &self.endpoint_disabled,
        ] {
            let _ = g.remove_label_values(&labels);
        }
        let _ = self.backlog_overflowed.remove_label_values(&labels);
        let _ = self.delivery_duration.remove_label_values(&labels);
        let _ = self.replayed.remove_label_values(&labels);
        let _ = self.not_granted.remove_label_values(&labels);
        for outcome in ["queued", "sink_missing"] {
            let _ = self
                .dead_letter_forwards
                .remove_label_values(&[namespace, subscription, outcome]);
        }
        for outcome in ["success", "failure", "gone"] {
            for class in ["2xx", "3xx", "4xx", "5xx", "other", "transport"] {
                let _ = self
                    .deliveries
                    .remove_label_values(&[namespace, subscription, outcome, class]);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// Makes each metric and registers it in the same call, so none can be made and left out
/// of `/metrics`.
struct Registrar(Registry);

impl Registrar {
    fn add<M: Collector + Clone + 'static>(&self, metric: M) -> Result<M, prometheus::Error> {
        self.0.register(Box::new(metric.clone()))?;
        Ok(metric)
    }

    fn counter(&self, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
        self.add(IntCounter::new(name, help)?)
    }

    fn gauge(&self, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
        self.add(IntGauge::new(name, help)?)
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
        self.add(IntCounterVec::new(Opts::new(name, help), labels)?)
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, prometheus::Error> {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels)?)
    }

    fn histogram_vec(&self, opts: HistogramOpts, labels: &[&str]) -> Result<HistogramVec, prometheus::Error> {
        self.add(HistogramVec::new(opts, labels)?)
    }
}

/// The process: its build, and the panics it caught.
fn process(r: &Registrar) -> Result<IntCounterVec, prometheus::Error> {
    let build_info = r.gauge_vec(
        "mailhook_build_info",
        "Build information; the value is always 1.",
        &["version"],
    )?;
    build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    r.counter_vec(
        "mailhook_panics_total",
        "Panics caught on the data path, by component (ingest, smtp, route, delivery, admin, mail_parser); the request got an error and the listener kept serving. Each one is a bug: please report it.",
        &["component"],
    )
}

/// What the sources took in, what they turned away, and whether it matched anything.
struct Ingest {
    events_ingested: IntCounterVec,
    events_routed: IntCounterVec,
    source_last_event: IntGaugeVec,
    refused: IntCounterVec,
}

fn ingest(r: &Registrar) -> Result<Ingest, prometheus::Error> {
    Ok(Ingest {
        events_ingested: r.counter_vec(
            "mailhook_events_ingested_total",
            "Events received from sources, by source and outcome (accepted, duplicate, rejected).",
            &["source", "outcome"],
        )?,
        events_routed: r.counter_vec(
            "mailhook_events_routed_total",
            "Accepted events by whether they matched at least one subscription (matched, unmatched).",
            &["result"],
        )?,
        source_last_event: r.gauge_vec(
            "mailhook_source_last_event_timestamp_seconds",
            "Unix time of the last events committed from each source (smtp, http, dovecot) and producer (the ingest or Dovecot credential's name; journal for the SMTP feed), on any replica sharing the store (updated within seconds here, within ~15 s from other replicas; kept across restarts). A producer appears once it has been heard from.",
            &["source", "producer"],
        )?,
        refused: r.counter_vec(
            "mailhook_listener_refused_total",
            "Connections and requests a listener turned away to stay within its bounds, by listener (ingest, admin, smtp) and reason: connections (--*-max-connections open already), connections_per_address (SMTP), body_timeout, body_too_large, body_unreadable, body_budget (too many request bodies in flight), token_concurrency (one credential's requests at once), token_bytes (one credential's quarter of the body budget), handshake_timeout (SMTP before MAIL), session_timeout, line_too_long. Connections closed by the header timeout are not counted.",
            &["listener", "reason"],
        )?,
    })
}

/// Deliveries and their endpoints, per subscription, and the requests in flight overall.
struct Delivery {
    deliveries: IntCounterVec,
    delivery_duration: HistogramVec,
    endpoint_up: IntGaugeVec,
    endpoint_disabled: IntGaugeVec,
    replayed: IntCounterVec,
    not_granted: IntCounterVec,
    dead_letter_forwards: IntCounterVec,
    requests_in_flight: IntGauge,
    requests_in_flight_limit: IntGauge,
}

fn delivery(r: &Registrar) -> Result<Delivery, prometheus::Error> {
    Ok(Delivery {
        deliveries: r.counter_vec(
            "mailhook_deliveries_total",
            "Delivery attempts by subscription, outcome (success, failure, gone) and HTTP status class.",
            &["namespace", "subscription", "outcome", "status_class"],
        )?,
        delivery_duration: r.histogram_vec(
            HistogramOpts::new(
                "mailhook_delivery_duration_seconds",
                "Time from sending a delivery to the endpoint's answer.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            SUBSCRIPTION,
        )?,
        endpoint_up: r.gauge_vec(
            "mailhook_endpoint_up",
            "1 when the last delivery to the endpoint succeeded, 0 when it is failing or disabled.",
            SUBSCRIPTION,
        )?,
        endpoint_disabled: r.gauge_vec(
            "mailhook_endpoint_disabled",
            "1 when deliveries to the endpoint are stopped (410 Gone or disableAfter).",
            SUBSCRIPTION,
        )?,
        replayed: r.counter_vec(
            "mailhook_dead_letters_replayed_total",
            "Dead letters queued again by a replay, per subscription.",
            SUBSCRIPTION,
        )?,
        not_granted: r.counter_vec(
            "mailhook_deliveries_not_granted_total",
            "Queued deliveries dead-lettered unsent because no MailboxGrant of the subscription's namespace covers their event any more, per subscription.",
            SUBSCRIPTION,
        )?,
        dead_letter_forwards: r.counter_vec(
            "mailhook_dead_letter_forwards_total",
            "Dead-lettered events sent on to the subscription's delivery.deadLetterSink, by outcome: queued (a copy is on its way), sink_missing (the sink subscription does not exist or is not valid; the event stays a dead letter).",
            &["namespace", "subscription", "outcome"],
        )?,
        requests_in_flight: r.gauge(
            "mailhook_delivery_requests_in_flight",
            "Delivery requests in flight over every subscription (a batch is one request).",
        )?,
        requests_in_flight_limit: r.gauge(
            "mailhook_delivery_requests_in_flight_limit",
            "The most delivery requests in flight at once over every subscription (--max-deliveries-in-flight; 4 until the start is over); while the first metric is at it, subscriptions take turns for free slots.",
        )?,
    })
}

/// What waits to be delivered, and what was given up, per subscription.
struct Backlog {
    backlog: IntGaugeVec,
    backlog_bytes: IntGaugeVec,
    backlog_oldest_age: IntGaugeVec,
    backlog_full: IntGaugeVec,
    backlog_overflowed: IntCounterVec,
    dead_letters: IntGaugeVec,
}

fn backlog(r: &Registrar) -> Result<Backlog, prometheus::Error> {
    Ok(Backlog {
        backlog: r.gauge_vec(
            "mailhook_backlog",
            "Events waiting to be delivered, per subscription.",
            SUBSCRIPTION,
        )?,
        backlog_bytes: r.gauge_vec(
            "mailhook_backlog_bytes",
            "Bytes of the events waiting to be delivered, per subscription (what delivery.maxBacklog.bytes caps).",
            SUBSCRIPTION,
        )?,
        backlog_oldest_age: r.gauge_vec(
            "mailhook_backlog_oldest_age_seconds",
            "Seconds since the oldest event still waiting to be delivered was accepted, per subscription; 0 when none waits.",
            SUBSCRIPTION,
        )?,
        backlog_full: r.gauge_vec(
            "mailhook_backlog_full",
            "1 while the subscription's backlog is at its delivery.maxBacklog: its new events go straight to its dead letters (status Healthy=False, reason BacklogFull).",
            SUBSCRIPTION,
        )?,
        backlog_overflowed: r.counter_vec(
            "mailhook_backlog_overflowed_total",
            "Deliveries sent straight to the dead letters because the subscription's backlog was at its delivery.maxBacklog, per subscription.",
            SUBSCRIPTION,
        )?,
        dead_letters: r.gauge_vec(
            "mailhook_dead_letters",
            "Events that exhausted their retries or expired, per subscription.",
            SUBSCRIPTION,
        )?,
    })
}

/// The store: which one, whether it takes events, its disk, and its housekeeping.
struct Store {
    store_disk_bytes: IntGauge,
    store_volume_bytes: IntGauge,
    store_volume_available_bytes: IntGauge,
    store_queue_rows_read: IntCounter,
    store_kind: IntGaugeVec,
    store_up: IntGauge,
    store_backlog: IntGauge,
    store_purged: IntCounterVec,
    store_errors: IntCounterVec,
}

fn store(r: &Registrar) -> Result<Store, prometheus::Error> {
    Ok(Store {
        store_disk_bytes: r.gauge(
            "mailhook_store_disk_bytes",
            "Bytes the durable store occupies on disk (0 for the in-memory store).",
        )?,
        store_volume_bytes: r.gauge(
            "mailhook_store_volume_bytes",
            "Size of the volume the embedded store lives on (--store-dir); 0 for PostgreSQL or in memory.",
        )?,
        store_volume_available_bytes: r.gauge(
            "mailhook_store_volume_available_bytes",
            "Bytes still available on the store's volume (--store-dir). When a write fails for want of space, new events are refused (HTTP 507 with Retry-After, SMTP 452) until the volume has room again; deliveries go on.",
        )?,
        store_queue_rows_read: r.counter(
            "mailhook_store_queue_rows_read_total",
            "Queued deliveries read from the embedded store since start. Memory holds a window of each subscription's queue and reads the rest as it is delivered, so right after a start this counts queue heads, not the backlog.",
        )?,
        store_kind: r.gauge_vec(
            "mailhook_store_info",
            "The store the operator runs on, by kind (redb, memory, postgres); the value is always 1.",
            &["kind"],
        )?,
        store_up: r.gauge(
            "mailhook_store_up",
            "1 while the store takes new events; 0 while its commits fail (new events refused, deliveries paused) or its volume has no room for new events (refused; deliveries go on).",
        )?,
        store_backlog: r.gauge(
            "mailhook_store_backlog",
            "Deliveries waiting or in flight in the store, over every subscription, including any not (or no longer) known to the controllers.",
        )?,
        store_purged: r.counter_vec(
            "mailhook_store_purged_total",
            "Records deleted by retention, by kind (dead_letter, attempt, producer_id, raw_message, indexed_message; event: events no delivery refers to any more, on a shared store), and the work of deleted subscriptions dropped at start-up (orphaned_subscription, orphaned_delivery).",
            &["kind"],
        )?,
        store_errors: r.counter_vec(
            "mailhook_store_errors_total",
            "Store operations that failed, by operation: commit (a transaction the store could not write), and on the delivery path retry, dead_letter, dead_letter_sink (the copy for delivery.deadLetterSink), complete, attempt, read_event, note_subscription. Failed retry/dead_letter writes are tried again with backoff; a delivery whose outcome could not be written is due again after a restart.",
            &["operation"],
        )?,
    })
}

/// The controllers: readiness, reconciles, status writes and routing table rebuilds.
struct Controller {
    ready: IntGauge,
    reconcile_duration: HistogramVec,
    reconcile_errors: IntCounterVec,
    status_writes: IntCounterVec,
    route_rebuilds: IntCounter,
}

fn controller(r: &Registrar) -> Result<Controller, prometheus::Error> {
    Ok(Controller {
        ready: r.gauge(
            "mailhook_ready",
            "1 when the operator is ready (caches synced, every resource reconciled), as /readyz.",
        )?,
        reconcile_duration: r.histogram_vec(
            HistogramOpts::new(
                "mailhook_reconcile_duration_seconds",
                "Time spent reconciling one resource, by kind.",
            ),
            &["kind"],
        )?,
        reconcile_errors: r.counter_vec(
            "mailhook_reconcile_errors_total",
            "Reconciles that failed and were retried, by kind.",
            &["kind"],
        )?,
        status_writes: r.counter_vec(
            "mailhook_status_writes_total",
            "Status writes to the Kubernetes API, by kind and outcome (written, failed).",
            &["kind", "outcome"],
        )?,
        route_rebuilds: r.counter(
            "mailhook_route_rebuilds_total",
            "Rebuilds of the routing table; changes arriving together are coalesced into one.",
        )?,
    })
}

/// Replicas: the shards of a shared store, and the leader Lease.
/// The audit log and its checkpoints.
fn audit(r: &Registrar) -> Result<(IntGauge, IntGauge, IntCounter), prometheus::Error> {
    Ok((
        r.gauge(
            "mailhook_audit_log_size",
            "Leaves in the audit log (events accepted, delivery attempts, acts of custody), as the last checkpoint pass read it.",
        )?,
        r.gauge(
            "mailhook_audit_checkpoint_size",
            "The tree size of the newest signed checkpoint of the audit log.",
        )?,
        r.counter(
            "mailhook_audit_checkpoint_failures_total",
            "Checkpoint passes that signed nothing because the log no longer extends the newest checkpoint (history rewritten, or a restore not recorded) or the store failed.",
        )?,
    ))
}

struct Replicas {
    shard_owned: IntGaugeVec,
    shard_handovers: IntCounterVec,
    leader: IntGauge,
    leader_transitions: IntCounter,
    fenced_writes: IntCounter,
}

fn replicas(r: &Registrar) -> Result<Replicas, prometheus::Error> {
    Ok(Replicas {
        shard_owned: r.gauge_vec(
            "mailhook_shard_owned",
            "Shared store: 1 for each delivery shard this replica owns (absent otherwise).",
            &["shard"],
        )?,
        shard_handovers: r.counter_vec(
            "mailhook_shard_handovers_total",
            "Shared store: shards this replica took (acquired), gave back (released) or lost with its database session (lost).",
            &["direction"],
        )?,
        leader: r.gauge(
            "mailhook_leader",
            "1 while this replica holds the leader Lease: it writes status and Events and runs store-wide housekeeping.",
        )?,
        leader_transitions: r.counter(
            "mailhook_leader_transitions_total",
            "Times this replica became or stopped being the leader.",
        )?,
        fenced_writes: r.counter(
            "mailhook_fenced_writes_total",
            "Shared store: delivery writes refused by the database because another replica claimed the shard since.",
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each family is registered once (a name used twice fails `new`) with its help, in
    /// a registry of its own.
    #[test]
    fn metrics_register_once_with_their_help() {
        let m = Metrics::new().expect("metrics");
        let text = m.render().expect("render");
        assert!(
            text.contains("# HELP mailhook_build_info Build information; the value is always 1.\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE mailhook_store_up gauge\n"), "{text}");
        assert!(Metrics::new().is_ok(), "a second Metrics has its own registry");
    }
}
