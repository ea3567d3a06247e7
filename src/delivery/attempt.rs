//! One delivery attempt: the signed POST, what its answer means, and recording the outcome
//! (attempt log, health, retry or dead letter, metrics). `classify`, `transport_message` and
//! `decide` are pure; `attempt_once` and `deliver` do the I/O around them. Depends on the
//! registry's types (`super::Deliveries`, the shard's `Subscription`) and the helpers
//! beside it (`payload`, `signing`, `retry`, `health`, `egress`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use super::health::Failure;
use super::retry::Next;
use super::shard::{Shard, Subscription};
use super::{Deliveries, DeliveryConfig, egress, retry, signing, wire};
use crate::metrics::Metrics;
use crate::route::Ceiling;
use crate::store::{Attempt, PendingDelivery, StoreError};

/// A Standard Webhooks POST of `request` to `url`, signed with every key of the
/// subscription (deliveries and verification requests alike): the signature covers the
/// body as sent, encrypted or not.
pub(super) fn signed_post(
    config: &DeliveryConfig,
    url: reqwest::Url,
    request: wire::Request,
) -> reqwest::RequestBuilder {
    let timestamp = jiff::Timestamp::now().as_second();
    let signature = signing::signature_header(&config.signing_keys, &request.id, timestamp, &request.body);
    // The client is shared by every subscription with the same TLS settings: this
    // subscription's timeout and extra headers go on its requests.
    let mut builder = config
        .client
        .post(url)
        .timeout(config.timeout)
        .headers(config.headers.clone())
        .header("content-type", request.content_type);
    for (name, value) in &request.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    builder
        .header("webhook-id", request.id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(request.body)
}

/// Why a redirect failed the attempt: redirects are never followed, and a target the
/// egress guard refuses (a redirect to a metadata address is the classic SSRF) says so.
async fn redirect_message(
    status: u16,
    location: Option<&reqwest::header::HeaderValue>,
    base: &reqwest::Url,
    policy: &egress::EgressPolicy,
) -> String {
    let Some(target) = location.and_then(|l| l.to_str().ok()).and_then(|l| base.join(l).ok()) else {
        return format!("HTTP {status}: redirects are not followed; point endpoint.url at the final URL");
    };
    let refused = tokio::time::timeout(Duration::from_secs(2), egress::check_host(policy, &target))
        .await
        .ok()
        .and_then(Result::err);
    match refused {
        Some(e) => format!("HTTP {status}: redirect to {target} not followed; {e}"),
        None => format!(
            "HTTP {status}: redirect to {target} not followed (redirects never are); point endpoint.url at the final URL"
        ),
    }
}

/// What an attempt came to.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Delivered {
        status: u16,
    },
    Failed {
        status: Option<u16>,
        message: String,
        retry_after: Option<Duration>,
    },
    Gone,
}

fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        Some(_) => "other",
        None => "transport",
    }
}

/// What an HTTP answer means, from its status and `Retry-After` alone.
#[derive(Debug, PartialEq, Eq)]
enum Classified {
    Done(Outcome),
    /// 3xx: a failure whose message the caller words (checking the target is async).
    Redirect,
}

fn classify(status: u16, retry_after: Option<Duration>) -> Classified {
    let failed = |message, retry_after| {
        Classified::Done(Outcome::Failed {
            status: Some(status),
            message,
            retry_after,
        })
    };
    match status {
        200..=299 => Classified::Done(Outcome::Delivered { status }),
        410 => Classified::Done(Outcome::Gone),
        // Only an answer that asks for a pause has its Retry-After honoured.
        429 | 502 | 503 | 504 => failed(format!("HTTP {status}: the endpoint asked to slow down"), retry_after),
        300..=399 => Classified::Redirect,
        _ => failed(format!("HTTP {status}"), None),
    }
}

/// Why a request got no answer; `cause` is the error's root cause.
fn transport_message(is_timeout: bool, is_connect: bool, cause: &str, timeout: Duration) -> String {
    if is_timeout {
        format!("no answer within {}s (endpoint.timeout)", timeout.as_secs_f32())
    } else if is_connect {
        format!("cannot connect: {cause}")
    } else {
        format!("request failed: {cause}")
    }
}

/// `webhook-id`: stable for one event and one subscription, so retries de-duplicate.
pub(super) fn webhook_id(event_id: &str, subscription: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(subscription.as_bytes());
    hasher.update(b"/");
    hasher.update(event_id.as_bytes());
    let digest = hasher.finalize();
    format!("msg_{}", crate::crypto::hex(digest.get(..16).unwrap_or_default()))
}

/// One signed POST of the events and what came of it (with its latency and end time).
/// One signed POST of the first `items` that fit the subscription's batch size, what came
/// of it (with its latency and end time), and how many of `items` it carried.
/// What a request carried, for the audit log: its `webhook-id` and the SHA-256 of its body.
#[derive(Debug, Clone, Default)]
struct Sent {
    webhook_id: Option<String>,
    body_sha256: Option<String>,
}

async fn attempt_once(
    config: &DeliveryConfig,
    url: &reqwest::Url,
    items: &[wire::Item<'_>],
) -> (Outcome, Duration, jiff::Timestamp, usize, Sent) {
    // An IP literal never reaches the guarded resolver: checked here, for the endpoint and
    // a dead-letter sink alike.
    // Nothing was sent: every item fails with `message`, as a transport error would.
    let unsent = |message: String| {
        let failed = Outcome::Failed {
            status: None,
            message,
            retry_after: None,
        };
        (
            failed,
            Duration::ZERO,
            jiff::Timestamp::now(),
            items.len(),
            Sent::default(),
        )
    };
    if let Err(refused) = config.egress.check_url(url) {
        return unsent(format!("not sent: {refused}"));
    }
    let max_bytes = config.batch.map_or(usize::MAX, |b| b.max_bytes);
    let (request, carried) = match wire::build(&config.wire, &config.payload, items, max_bytes) {
        Ok(built) => built,
        Err(err) => return unsent(format!("{err}: {}", root_cause(&err))),
    };
    let sent = Sent {
        webhook_id: Some(request.id.clone()),
        body_sha256: Some(crate::audit::sha256_hex(&request.body)),
    };
    let started = Instant::now();
    let response = signed_post(config, url.clone(), request).send().await;
    let elapsed = started.elapsed();
    let now = jiff::Timestamp::now();

    let outcome = match response {
        Ok(r) => {
            let status = r.status().as_u16();
            let retry_after = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry::parse_retry_after(v, now));
            match classify(status, retry_after) {
                Classified::Done(outcome) => outcome,
                Classified::Redirect => Outcome::Failed {
                    status: Some(status),
                    message: redirect_message(status, r.headers().get("location"), url, &config.egress).await,
                    retry_after: None,
                },
            }
        }
        Err(err) => Outcome::Failed {
            status: None,
            message: transport_message(err.is_timeout(), err.is_connect(), &root_cause(&err), config.timeout),
            retry_after: None,
        },
    };
    (outcome, elapsed, now, carried, sent)
}

/// How often a store write on the delivery path is tried before it is given up.
const STORE_WRITE_TRIES: u32 = 8;

/// Makes one store write of the delivery path (`what`: retry, dead_letter, complete,
/// attempt, read_event), trying again with backoff (100 ms doubling to 5 s, about 20 s in
/// all) while it fails: each failure is logged and counted. Given up, the delivery stays in
/// flight in memory and is due again from disk at the next start — never lost, never
/// repeated forever.
async fn store_write<T>(
    metrics: &Metrics,
    what: &'static str,
    subscription: &str,
    mut write: impl FnMut() -> Result<T, StoreError>,
) -> Option<T> {
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=STORE_WRITE_TRIES {
        match write() {
            Ok(v) => return Some(v),
            Err(err) => {
                metrics.store_errors.with_label_values(&[what]).inc();
                if attempt == STORE_WRITE_TRIES {
                    tracing::error!(
                        %err, operation = what, subscription, attempts = attempt,
                        "store write failed; giving up for now: the delivery is due again after a restart"
                    );
                    return None;
                }
                warn!(%err, operation = what, subscription, attempt, "store write failed; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    None
}

/// What follows an attempt, from its outcome alone; `deliver` carries it out.
#[derive(Debug, PartialEq, Eq)]
struct Decision {
    /// For the attempt log.
    http_status: Option<u16>,
    error: Option<String>,
    health: HealthUpdate,
    next: Step,
    /// Metric labels: outcome, status class.
    labels: (&'static str, &'static str),
}

#[derive(Debug, PartialEq, Eq)]
enum HealthUpdate {
    Success,
    /// The failure, and why the endpoint is disabled now, if it is.
    Failure(Failure, Option<String>),
}

/// What becomes of the pending delivery.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Complete,
    /// 410: queued again as it is; the endpoint is disabled, the event kept.
    Keep,
    RetryAt(jiff::Timestamp),
    DeadLetter(String),
}

/// `d` has its attempts counted already; `failing_since` is the health's before this
/// attempt.
fn decide(
    outcome: &Outcome,
    d: &PendingDelivery,
    now: jiff::Timestamp,
    failing_since: Option<jiff::Timestamp>,
    policy: retry::Policy<'_>,
    disable_after: Duration,
    jitter: f64,
) -> Decision {
    match outcome {
        Outcome::Delivered { status } => Decision {
            http_status: Some(*status),
            error: None,
            health: HealthUpdate::Success,
            next: Step::Complete,
            labels: ("success", status_class(Some(*status))),
        },
        // 410: the receiver asked us to stop. Keep the event; stop the endpoint.
        Outcome::Gone => Decision {
            http_status: Some(410),
            error: Some("HTTP 410 Gone".into()),
            health: HealthUpdate::Failure(
                Failure {
                    time: now,
                    http_status: Some(410),
                    message: "HTTP 410 Gone: the endpoint asked to stop deliveries".into(),
                    not_before: None,
                },
                Some("the endpoint answered 410 Gone".into()),
            ),
            next: Step::Keep,
            labels: ("gone", "4xx"),
        },
        Outcome::Failed {
            status,
            message,
            retry_after,
        } => {
            let failing_for = failing_since.map(|t| now.duration_since(t)).unwrap_or_default();
            let disable = (failing_for
                > jiff::SignedDuration::try_from(disable_after).unwrap_or(jiff::SignedDuration::MAX))
            .then(|| {
                format!(
                    "failing for longer than delivery.disableAfter ({}s)",
                    disable_after.as_secs()
                )
            });
            let next = match retry::after_failure(policy, d.attempts, *retry_after, d.accepted_at, now, jitter) {
                Next::RetryAt(at) => Step::RetryAt(at),
                Next::DeadLetter(reason) => Step::DeadLetter(format!("{reason}; last error: {message}")),
            };
            Decision {
                http_status: *status,
                error: Some(message.clone()),
                health: HealthUpdate::Failure(
                    Failure {
                        time: now,
                        http_status: *status,
                        message: message.clone(),
                        not_before: retry_after.map(|r| {
                            let r = jiff::SignedDuration::try_from(r.min(policy.max_retry_after))
                                .unwrap_or(jiff::SignedDuration::MAX);
                            now.checked_add(r).unwrap_or(jiff::Timestamp::MAX)
                        }),
                    },
                    disable,
                ),
                next,
                labels: ("failure", status_class(*status)),
            }
        }
    }
}

/// A delivery, with its event when the shard read it already.
pub(super) type Taken = (PendingDelivery, Option<Arc<crate::event::MailboxEvent>>);

/// Reads the events of `batch`: those found, in order; a delivery whose event is gone is
/// dead-lettered, one whose read failed is tried again in a second. What neither the shard
/// nor memory holds is read in one go, off the async workers.
async fn read_events(
    deliveries: &Deliveries,
    name: &str,
    batch: Vec<Taken>,
) -> Vec<(PendingDelivery, Arc<crate::event::MailboxEvent>)> {
    let (store, metrics) = (&deliveries.store, &deliveries.metrics);
    let (batch, read): (Vec<PendingDelivery>, Vec<_>) = batch
        .into_iter()
        .map(|(d, e)| {
            let e = e.or_else(|| store.cached_event(&d.event_id));
            (d, e)
        })
        .unzip();
    let mut read: Vec<Result<Option<Arc<crate::event::MailboxEvent>>, StoreError>> = read.into_iter().map(Ok).collect();
    let missing: Vec<String> = batch
        .iter()
        .zip(&read)
        .filter(|(_, e)| matches!(e, Ok(None)))
        .map(|(d, _)| d.event_id.clone())
        .collect();
    if !missing.is_empty() {
        let store = store.clone();
        let found = tokio::task::spawn_blocking(move || store.events(&missing))
            .await
            .unwrap_or_else(|e| vec![Err(StoreError::Failed(format!("reading the events stopped: {e}")))]);
        let mut found = found.into_iter();
        let mut last_err = None;
        for slot in read.iter_mut().filter(|e| matches!(e, Ok(None))) {
            *slot = match found.next() {
                Some(Err(err)) => {
                    last_err = Some(err.to_string());
                    Err(err)
                }
                Some(ok) => ok,
                // The read stopped short (its thread failed): as its error says.
                None => Err(StoreError::Failed(
                    last_err.clone().unwrap_or_else(|| "the event was not read".into()),
                )),
            };
        }
    }
    let mut ready = Vec::with_capacity(batch.len());
    for (mut d, read) in batch.into_iter().zip(read) {
        match read {
            Ok(Some(e)) => ready.push((d, e)),
            Ok(None) => {
                let reason = "the event is no longer in the store";
                store_write(metrics, "dead_letter", name, || {
                    store.dead_letter(d.clone(), reason.into())
                })
                .await;
            }
            Err(err) => {
                metrics.store_errors.with_label_values(&["read_event"]).inc();
                warn!(%err, subscription = name, "cannot read the event; will retry in 1 s");
                d.not_before = jiff::Timestamp::now() + Duration::from_secs(1);
                store_write(metrics, "retry", name, || store.retry(d.clone())).await;
            }
        }
    }
    ready
}

/// Keeps the deliveries of `ready` that the MailboxGrants of the subscription's namespace
/// still cover, with the most each may show; the others are dead-lettered unsent (a
/// revoked grant stops what was queued under it; a replay checks again). Finding one
/// withheld means a grant went away: the rest of the queue that is due is swept now, not
/// one delivery per request slot (a failing endpoint gets one slot a second).
async fn granted(
    deliveries: &Deliveries,
    config: &super::DeliveryConfig,
    ready: Vec<(PendingDelivery, Arc<crate::event::MailboxEvent>)>,
) -> Vec<(PendingDelivery, Arc<crate::event::MailboxEvent>, Ceiling)> {
    let table = deliveries.router.current();
    let (kept, withheld) = withhold_ungranted(deliveries, config, table.grants(), ready).await;
    if withheld > 0 {
        let mut swept = withheld;
        loop {
            let due = match deliveries
                .store
                .take_due(&config.uid, jiff::Timestamp::now(), SWEEP, config.ordered)
            {
                Ok(due) if !due.is_empty() => due,
                Ok(_) => break,
                Err(err) => {
                    // What is left is met one by one as it comes due, as before the sweep.
                    warn!(%err, subscription = config.name, "cannot read the delivery queue to withhold ungranted deliveries");
                    break;
                }
            };
            let due = due.into_iter().map(|d| (d, None)).collect();
            let read = read_events(deliveries, &config.name, due).await;
            let (granted, withheld) = withhold_ungranted(deliveries, config, table.grants(), read).await;
            for (d, _, _) in granted {
                store_write(&deliveries.metrics, "retry", &config.name, || {
                    deliveries.store.retry(d.clone())
                })
                .await;
            }
            swept += withheld;
            if withheld == 0 {
                break;
            }
        }
        info!(
            namespace = config.namespace,
            subscription = config.name,
            withheld = swept,
            "queued deliveries no MailboxGrant covers any more were dead-lettered unsent"
        );
    }
    kept
}

/// Deliveries taken at once by the sweep after a revoked grant.
const SWEEP: usize = 512;

/// Splits `ready` into what the grants still cover (with its ceiling) and dead-letters the
/// rest; returns the kept and how many were withheld.
async fn withhold_ungranted(
    deliveries: &Deliveries,
    config: &super::DeliveryConfig,
    grants: &crate::route::Grants,
    ready: Vec<(PendingDelivery, Arc<crate::event::MailboxEvent>)>,
) -> (Vec<(PendingDelivery, Arc<crate::event::MailboxEvent>, Ceiling)>, usize) {
    let mut kept = Vec::with_capacity(ready.len());
    let mut withheld = 0;
    for (d, e) in ready {
        match grants.ceiling(&config.namespace, &e) {
            Some(ceiling) => kept.push((d, e, ceiling)),
            None => {
                withheld += 1;
                let reason = format!(
                    "not sent: no MailboxGrant of namespace {} covers this event any more",
                    config.namespace
                );
                deliveries
                    .metrics
                    .not_granted
                    .with_label_values(&[&config.namespace, &config.name])
                    .inc();
                store_write(&deliveries.metrics, "dead_letter", &config.name, || {
                    deliveries.store.dead_letter(d.clone(), reason.clone())
                })
                .await;
            }
        }
    }
    (kept, withheld)
}

/// Where a delivery of `event` goes: a dead-letter copy for a `deadLetterSink.uri` goes
/// there, everything else to the endpoint.
fn target(sub: &Subscription, event: &crate::event::MailboxEvent) -> reqwest::Url {
    event
        .dead_letter
        .as_ref()
        .and_then(|n| n.sink_uri.as_deref())
        .and_then(|u| reqwest::Url::parse(u).ok())
        .unwrap_or_else(|| sub.url.clone())
}

/// Makes one request of `batch` (one delivery, or several with `delivery.batch`) and
/// records what came of it for each.
pub(super) async fn deliver(
    deliveries: Arc<Deliveries>,
    shard: Arc<Shard>,
    sub: Arc<Subscription>,
    batch: Vec<Taken>,
    slot: super::shard::Slot,
) {
    let config = &sub.config;
    let store = &deliveries.store;
    let metrics = &deliveries.metrics;
    let name = config.name.as_str();
    let read = read_events(&deliveries, name, batch).await;
    let mut ready = granted(&deliveries, config, read).await;
    let Some(url) = ready.first().map(|(_, e, _)| target(&sub, e)) else {
        drop(slot);
        shard.wake.notify_one();
        return;
    };
    // One request goes to one place: a dead-letter copy for a sink URI is not sent with
    // events for the endpoint. What does not go now (nor what does not fit in maxBytes,
    // below) waits for the next request, its attempts unchanged.
    let same_target = ready.iter().take_while(|(_, e, _)| target(&sub, e) == url).count();
    for (d, _, _) in ready.split_off(same_target.max(1)) {
        store_write(metrics, "retry", name, || store.retry(d.clone())).await;
    }

    let items: Vec<wire::Item<'_>> = ready
        .iter()
        .map(|(d, e, ceiling)| wire::Item {
            event: e,
            matched_filters: &d.matched_filters,
            webhook_id: webhook_id(&e.id, &config.uid),
            ceiling: *ceiling,
        })
        .collect();
    // Rendering and the request run on the events' data: a panic there (a bug) is a failed
    // attempt like any other, retried on the schedule (no sooner than a minute) and in the
    // end dead-lettered, never a delivery stuck in flight.
    let tried = std::panic::AssertUnwindSafe(attempt_once(config, &url, &items))
        .catch_unwind()
        .await;
    drop(items);
    let (mut outcome, elapsed, now, carried, sent) = tried.unwrap_or_else(|_| {
        crate::panics::record(&deliveries.metrics, "delivery");
        let failed = Outcome::Failed {
            status: None,
            message: crate::panics::ANSWER.into(),
            retry_after: Some(Duration::from_secs(60)),
        };
        (
            failed,
            Duration::ZERO,
            jiff::Timestamp::now(),
            ready.len(),
            Sent::default(),
        )
    });
    for (d, _, _) in ready.split_off(carried.clamp(1, ready.len().max(1))) {
        store_write(metrics, "retry", name, || store.retry(d.clone())).await;
    }
    if url != sub.url && outcome == Outcome::Gone {
        // 410 stops the endpoint, not its dead-letter sink: retried on the schedule.
        outcome = Outcome::Failed {
            status: Some(410),
            message: "HTTP 410 Gone from the dead-letter sink".into(),
            retry_after: None,
        };
    }
    let policy = retry::Policy {
        schedule: &config.retry_schedule,
        max_event_age: config.max_event_age,
        max_retry_after: config.max_retry_after,
    };
    let failing_since = sub.health.failing_since();
    if let Outcome::Failed { message, .. } = &outcome {
        debug!(subscription = config.name, %message, events = ready.len(), "delivery failed");
    }

    let mut changed = false;
    let events = ready.len() as u64;
    let mut completions = Vec::new();
    let mut labels = ("success", "2xx");
    let mut delivered = 0;
    for (i, (mut d, event, _)) in ready.into_iter().enumerate() {
        d.attempts += 1;
        let decision = decide(
            &outcome,
            &d,
            now,
            failing_since,
            policy,
            config.disable_after,
            retry::jitter(),
        );
        labels = decision.labels;
        let attempt = Attempt {
            subscription: d.subscription.clone(),
            event_id: d.event_id.clone(),
            attempt: d.attempts,
            at: now,
            http_status: decision.http_status,
            error: decision.error.clone(),
            latency_ms: elapsed.as_millis() as u64,
            log_index: event.log_index.get(),
            webhook_id: sent.webhook_id.clone(),
            body_sha256: sent.body_sha256.clone(),
            mailbox: Some(event.mailbox.clone()),
        };
        // Queued before the completion below, so it is on disk no later than it.
        // The audit log is not worth holding the delivery up for: one try, counted.
        if let Err(err) = store.record_attempt(attempt) {
            metrics.store_errors.with_label_values(&["attempt"]).inc();
            warn!(%err, subscription = name, "cannot log a delivery attempt");
        }
        // The request's outcome is one: health follows it once, not once per event; a
        // request to a dead-letter sink URI says nothing about the endpoint.
        let first = i == 0 && url == sub.url;
        let update_health = |update| match update {
            HealthUpdate::Success => sub.health.success(now, elapsed.as_millis() as u64, events),
            HealthUpdate::Failure(failure, disable) => sub.health.failure(failure, disable, events),
        };
        // Each arm keeps the order of store write and health update that `deliver` always
        // had: a failure's health (which may disable the endpoint) is set before its retry
        // is queued.
        match decision.next {
            Step::Complete => {
                delivered += 1;
                match store.complete(&d) {
                    Ok(durable) => completions.push(durable),
                    Err(err) => complete_failed(metrics, name, &err),
                }
                if first {
                    changed |= update_health(decision.health);
                }
            }
            Step::Keep => {
                store_write(metrics, "retry", name, || store.retry(d.clone())).await;
                if first {
                    changed |= update_health(decision.health);
                }
            }
            Step::RetryAt(at) => {
                if first {
                    changed |= update_health(decision.health);
                }
                d.not_before = at;
                store_write(metrics, "retry", name, || store.retry(d.clone())).await;
            }
            Step::DeadLetter(reason) => {
                if first {
                    changed |= update_health(decision.health);
                }
                if config.dead_letter_sink.is_some() && event.dead_letter.is_none() {
                    // Copied before the dead letter is written: a crash between the two
                    // makes the delivery due again, and its copy a duplicate (dropped).
                    let (status, error) = match &outcome {
                        Outcome::Failed { status, message, .. } => (*status, Some(message.clone())),
                        Outcome::Gone => (Some(410), Some("HTTP 410 Gone".into())),
                        Outcome::Delivered { .. } => (None, None),
                    };
                    let why = super::dead_letter::Why {
                        reason: reason.clone(),
                        attempts: d.attempts,
                        last_status: status,
                        last_error: error,
                    };
                    deliveries.forward_dead_letter(config, &event, &d, why).await;
                }
                store_write(metrics, "dead_letter", name, || {
                    store.dead_letter(d.clone(), reason.clone())
                })
                .await;
            }
        }
    }
    // Still holding the delivery slot: the completions are durable before the slot frees.
    for durable in completions {
        if let Err(err) = durable.wait().await {
            complete_failed(metrics, name, &err);
        }
    }
    let (outcome_label, status_label) = labels;
    if status_label == "2xx" && outcome_label == "success" {
        sub.success.0.inc_by(delivered);
        sub.success.1.observe(elapsed.as_secs_f64());
    } else {
        deliveries
            .metrics
            .delivery(&config.namespace, &config.name, outcome_label, status_label, elapsed);
    }
    if changed {
        deliveries.health_changed.notify_one();
    }
    // Free before the wake-up, so the shard finds the slot free.
    drop(slot);
    shard.wake.notify_one();
}

/// Not retried: the completion may be on disk already; if not, the delivery is made once
/// more after a restart (receivers de-duplicate by webhook-id).
fn complete_failed(metrics: &Metrics, name: &str, err: &StoreError) {
    metrics.store_errors.with_label_values(&["complete"]).inc();
    warn!(%err, subscription = name, "cannot record a completed delivery; it may be made again");
}

pub(super) fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn at(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(s).expect("valid")
    }

    fn failed(status: Option<u16>, message: &str, retry_after: Option<Duration>) -> Outcome {
        Outcome::Failed {
            status,
            message: message.into(),
            retry_after,
        }
    }

    #[test]
    fn classifies_every_status_class() {
        let asked = Some(S(30));
        for status in [200, 201, 204, 299] {
            assert_eq!(classify(status, asked), Classified::Done(Outcome::Delivered { status }));
        }
        assert_eq!(classify(410, asked), Classified::Done(Outcome::Gone));
        for status in [429, 502, 503, 504] {
            let message = format!("HTTP {status}: the endpoint asked to slow down");
            assert_eq!(
                classify(status, asked),
                Classified::Done(failed(Some(status), &message, asked))
            );
            assert_eq!(
                classify(status, None),
                Classified::Done(failed(Some(status), &message, None))
            );
        }
        for status in [300, 301, 302, 307, 308, 399] {
            assert_eq!(classify(status, asked), Classified::Redirect);
        }
        for status in [100, 199, 400, 404, 409, 411, 428, 430, 500, 501, 505, 599, 600] {
            assert_eq!(
                classify(status, asked),
                Classified::Done(failed(Some(status), &format!("HTTP {status}"), None))
            );
        }
    }

    #[test]
    fn retry_after_is_passed_only_for_429_502_503_504() {
        for status in 100..=599 {
            let passed = matches!(
                classify(status, Some(S(30))),
                Classified::Done(Outcome::Failed {
                    retry_after: Some(_),
                    ..
                })
            );
            assert_eq!(passed, matches!(status, 429 | 502 | 503 | 504), "HTTP {status}");
        }
    }

    #[test]
    fn transport_errors_say_what_happened() {
        let timed_out = "no answer within 10s (endpoint.timeout)";
        assert_eq!(transport_message(true, false, "deadline has elapsed", S(10)), timed_out);
        // A connect that times out is reported as a timeout.
        assert_eq!(transport_message(true, true, "deadline has elapsed", S(10)), timed_out);
        assert_eq!(
            transport_message(true, false, "", Duration::from_millis(2500)),
            "no answer within 2.5s (endpoint.timeout)"
        );
        assert_eq!(
            transport_message(false, true, "Connection refused (os error 111)", S(10)),
            "cannot connect: Connection refused (os error 111)"
        );
        assert_eq!(
            transport_message(false, false, "unexpected end of file", S(10)),
            "request failed: unexpected end of file"
        );
    }

    static SCHEDULE: [Duration; 3] = [Duration::ZERO, Duration::from_secs(5), Duration::from_secs(300)];

    fn policy() -> retry::Policy<'static> {
        retry::Policy {
            schedule: &SCHEDULE,
            max_event_age: S(3600),
            max_retry_after: S(600),
        }
    }

    /// A pending delivery after its `attempts`-th attempt, accepted at 0.
    fn pending(attempts: u32) -> PendingDelivery {
        PendingDelivery {
            subscription: "sub-uid".into(),
            event_id: "evt_1".into(),
            attempts,
            not_before: at(0),
            accepted_at: at(0),
            ordering_key: None,
            matched_filters: Vec::new(),
            seq: 0,
        }
    }

    fn disabled(decision: &Decision) -> Option<&str> {
        match &decision.health {
            HealthUpdate::Failure(_, disable) => disable.as_deref(),
            HealthUpdate::Success => None,
        }
    }

    #[test]
    fn a_delivery_completes_and_is_healthy_even_after_long_failing() {
        let decision = decide(
            &Outcome::Delivered { status: 204 },
            &pending(1),
            at(100_000),
            Some(at(0)),
            policy(),
            S(60),
            1.0,
        );
        assert_eq!(
            decision,
            Decision {
                http_status: Some(204),
                error: None,
                health: HealthUpdate::Success,
                next: Step::Complete,
                labels: ("success", "2xx"),
            }
        );
    }

    #[test]
    fn gone_keeps_the_event_and_disables_the_endpoint() {
        let decision = decide(&Outcome::Gone, &pending(1), at(100), None, policy(), S(3600), 1.0);
        assert_eq!(
            decision,
            Decision {
                http_status: Some(410),
                error: Some("HTTP 410 Gone".into()),
                health: HealthUpdate::Failure(
                    Failure {
                        time: at(100),
                        http_status: Some(410),
                        message: "HTTP 410 Gone: the endpoint asked to stop deliveries".into(),
                        not_before: None,
                    },
                    Some("the endpoint answered 410 Gone".into()),
                ),
                next: Step::Keep,
                labels: ("gone", "4xx"),
            }
        );
    }

    #[test]
    fn a_failure_is_retried_on_the_schedule_with_retry_after_as_a_floor() {
        let message = "HTTP 503: the endpoint asked to slow down";
        let outcome = failed(Some(503), message, Some(S(60)));
        let decision = decide(&outcome, &pending(1), at(100), None, policy(), S(3600), 1.0);
        assert_eq!(
            decision,
            Decision {
                http_status: Some(503),
                error: Some(message.into()),
                health: HealthUpdate::Failure(
                    Failure {
                        time: at(100),
                        http_status: Some(503),
                        message: message.into(),
                        // No probe before the endpoint's Retry-After either.
                        not_before: Some(at(160)),
                    },
                    None,
                ),
                next: Step::RetryAt(at(160)),
                labels: ("failure", "5xx"),
            }
        );
        // Without Retry-After, the schedule's entry (full jitter of 5 s).
        let outcome = failed(Some(500), "HTTP 500", None);
        let decision = decide(&outcome, &pending(1), at(100), None, policy(), S(3600), 1.0);
        assert_eq!(decision.next, Step::RetryAt(at(105)));
        assert_eq!(decision.labels, ("failure", "5xx"));
    }

    #[test]
    fn a_failure_past_the_schedule_is_a_dead_letter_with_its_last_error() {
        let outcome = failed(None, "cannot connect: Connection refused", None);
        let decision = decide(&outcome, &pending(3), at(100), None, policy(), S(3600), 1.0);
        assert_eq!(
            decision.next,
            Step::DeadLetter(
                "retries exhausted after 3 attempts; last error: cannot connect: Connection refused".into()
            )
        );
        assert_eq!(
            (decision.http_status, decision.labels),
            (None, ("failure", "transport"))
        );
    }

    #[test]
    fn failing_longer_than_disable_after_disables() {
        let outcome = failed(Some(500), "HTTP 500", None);
        let now = at(3_000);
        let decide_at = |failing_since, disable_after| {
            decide(&outcome, &pending(1), now, failing_since, policy(), disable_after, 1.0)
        };
        // Not failing before this attempt, or not for longer than disableAfter: not disabled.
        assert_eq!(disabled(&decide_at(None, S(0))), None);
        assert_eq!(disabled(&decide_at(Some(at(2_000)), S(1000))), None);
        assert_eq!(disabled(&decide_at(Some(now), S(0))), None);
        assert_eq!(
            disabled(&decide_at(Some(at(1_999)), S(1000))),
            Some("failing for longer than delivery.disableAfter (1000s)")
        );
        // A disableAfter beyond what a timestamp can span never disables.
        assert_eq!(disabled(&decide_at(Some(at(0)), Duration::MAX)), None);
        // Disabling does not change what becomes of the delivery.
        assert_eq!(decide_at(Some(at(0)), S(60)).next, Step::RetryAt(at(3_005)));
    }

    /// A failing store write is tried again with backoff and counted each time; one that
    /// keeps failing is given up (the delivery then waits for a restart), never looped on.
    #[tokio::test(start_paused = true)]
    async fn store_writes_are_retried_counted_and_bounded() {
        let metrics = Metrics::new().expect("metrics");
        let mut calls = 0;
        let got = store_write(&metrics, "retry", "siem", || {
            calls += 1;
            if calls < 3 {
                Err(StoreError::Failed("disk full".into()))
            } else {
                Ok(calls)
            }
        })
        .await;
        assert_eq!(got, Some(3));
        assert_eq!(metrics.store_errors.with_label_values(&["retry"]).get(), 2);

        let mut calls = 0;
        let got: Option<()> = store_write(&metrics, "dead_letter", "siem", || {
            calls += 1;
            Err(StoreError::Unavailable("the store's commit thread stopped".into()))
        })
        .await;
        assert_eq!((got, calls), (None, STORE_WRITE_TRIES));
        assert_eq!(
            metrics.store_errors.with_label_values(&["dead_letter"]).get(),
            u64::from(STORE_WRITE_TRIES)
        );
    }

    /// Receivers de-duplicate by `webhook-id`: it must not change between versions.
    #[test]
    fn webhook_id_is_stable() {
        let digest = Sha256::digest(b"sub-uid/evt_1");
        let expected = format!(
            "msg_{}",
            digest.iter().take(16).map(|b| format!("{b:02x}")).collect::<String>()
        );
        assert_eq!(webhook_id("evt_1", "sub-uid"), expected);
        assert_eq!(expected.len(), 36);
    }
}
