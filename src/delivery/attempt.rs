//! One delivery attempt: the signed POST, what its answer means, and recording the outcome
//! (attempt log, health, retry or dead letter, metrics). Depends on the registry's types
//! (`super::Deliveries`, the shard's `Subscription`) and the pure helpers beside it
//! (`payload`, `signing`, `retry`, `health`, `egress`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use sha2::{Digest, Sha256};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, warn};

use super::health::Failure;
use super::retry::Next;
use super::shard::{Shard, Subscription};
use super::{Deliveries, DeliveryConfig, egress, payload, retry, signing};
use crate::metrics::Metrics;
use crate::store::{Attempt, PendingDelivery, StoreError};

/// A Standard Webhooks POST of `body` to `url`, signed with every key of the subscription
/// (deliveries and verification requests alike).
pub(super) fn signed_post(
    config: &DeliveryConfig,
    url: reqwest::Url,
    id: &str,
    body: Vec<u8>,
) -> reqwest::RequestBuilder {
    let timestamp = jiff::Timestamp::now().as_second();
    let signature = signing::signature_header(&config.signing_keys, id, timestamp, &body);
    config
        .client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
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

/// `webhook-id`: stable for one event and one subscription, so retries de-duplicate.
pub(super) fn webhook_id(event_id: &str, subscription: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(subscription.as_bytes());
    hasher.update(b"/");
    hasher.update(event_id.as_bytes());
    let digest = hasher.finalize();
    let mut id = String::with_capacity(36);
    id.push_str("msg_");
    for b in &digest[..16] {
        id.push(char::from(HEX[usize::from(b >> 4)]));
        id.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    id
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// One signed POST of the event and what came of it (with its latency and end time).
async fn attempt_once(
    config: &DeliveryConfig,
    url: &reqwest::Url,
    event: &crate::event::MailboxEvent,
    matched_filters: &[String],
) -> (Outcome, Duration, jiff::Timestamp) {
    let id = webhook_id(&event.id, &config.uid);
    let body = payload::render(event, matched_filters, &config.payload);
    let started = Instant::now();
    let response = signed_post(config, url.clone(), &id, body).send().await;
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
            match status {
                200..=299 => Outcome::Delivered { status },
                410 => Outcome::Gone,
                429 | 502 | 503 | 504 => Outcome::Failed {
                    status: Some(status),
                    message: format!("HTTP {status}: the endpoint asked to slow down"),
                    retry_after,
                },
                300..=399 => Outcome::Failed {
                    status: Some(status),
                    message: redirect_message(status, r.headers().get("location"), url, &config.egress).await,
                    retry_after: None,
                },
                _ => Outcome::Failed {
                    status: Some(status),
                    message: format!("HTTP {status}"),
                    retry_after: None,
                },
            }
        }
        Err(err) => {
            let message = if err.is_timeout() {
                format!("no answer within {}s (endpoint.timeout)", config.timeout.as_secs_f32())
            } else if err.is_connect() {
                format!("cannot connect: {}", root_cause(&err))
            } else {
                format!("request failed: {}", root_cause(&err))
            };
            Outcome::Failed {
                status: None,
                message,
                retry_after: None,
            }
        }
    };
    (outcome, elapsed, now)
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

pub(super) async fn deliver(
    deliveries: Arc<Deliveries>,
    shard: Arc<Shard>,
    sub: Arc<Subscription>,
    mut d: PendingDelivery,
    _permit: OwnedSemaphorePermit,
) {
    let config = &sub.config;
    let store = &deliveries.store;
    let metrics = &deliveries.metrics;
    let name = config.name.as_str();
    let event = match store.event(&d.event_id) {
        Ok(Some(e)) => e,
        Ok(None) => {
            let reason = "the event is no longer in the store";
            store_write(metrics, "dead_letter", name, || {
                store.dead_letter(d.clone(), reason.into())
            })
            .await;
            return;
        }
        Err(err) => {
            metrics.store_errors.with_label_values(&["read_event"]).inc();
            warn!(%err, subscription = name, "cannot read the event; will retry in 1 s");
            d.not_before = jiff::Timestamp::now() + Duration::from_secs(1);
            store_write(metrics, "retry", name, || store.retry(d.clone())).await;
            return;
        }
    };
    if let Some(limiter) = &sub.limiter {
        limiter.until_ready().await;
    }

    // Rendering and the request run on the event's data: a panic there (a bug) is a failed
    // attempt like any other, retried on the schedule (no sooner than a minute) and in the
    // end dead-lettered, never a delivery stuck in flight.
    let tried = std::panic::AssertUnwindSafe(attempt_once(config, &sub.url, &event, &d.matched_filters))
        .catch_unwind()
        .await;
    let (outcome, elapsed, now) = tried.unwrap_or_else(|_| {
        crate::panics::record(&deliveries.metrics, "delivery");
        let failed = Outcome::Failed {
            status: None,
            message: crate::panics::ANSWER.into(),
            retry_after: Some(Duration::from_secs(60)),
        };
        (failed, Duration::ZERO, jiff::Timestamp::now())
    });
    d.attempts += 1;
    let mut attempt = Attempt {
        subscription: d.subscription.clone(),
        event_id: d.event_id.clone(),
        attempt: d.attempts,
        at: now,
        http_status: None,
        error: None,
        latency_ms: elapsed.as_millis() as u64,
    };

    match &outcome {
        Outcome::Delivered { status } => attempt.http_status = Some(*status),
        Outcome::Gone => {
            attempt.http_status = Some(410);
            attempt.error = Some("HTTP 410 Gone".into());
        }
        Outcome::Failed { status, message, .. } => {
            attempt.http_status = *status;
            attempt.error = Some(message.clone());
        }
    }
    // Queued before the completion below, so it is on disk no later than it.
    // The audit log is not worth holding the delivery up for: one try, counted.
    if let Err(err) = store.record_attempt(attempt) {
        metrics.store_errors.with_label_values(&["attempt"]).inc();
        warn!(%err, subscription = name, "cannot log a delivery attempt");
    }

    let (outcome_label, status_label, changed) = match outcome {
        Outcome::Delivered { status } => {
            // Still holding the delivery slot: the completion is durable before the slot frees.
            if let Err(err) = async { store.complete(&d)?.wait().await }.await {
                // Not retried: the completion may be on disk already; if not, the delivery
                // is made once more after a restart (receivers de-duplicate by webhook-id).
                metrics.store_errors.with_label_values(&["complete"]).inc();
                warn!(%err, subscription = name, "cannot record a completed delivery; it may be made again");
            }
            let changed = sub.health.success(now, elapsed.as_millis() as u64);
            ("success", status_class(Some(status)), changed)
        }
        Outcome::Gone => {
            // 410: the receiver asked us to stop. Keep the event; stop the endpoint.
            store_write(metrics, "retry", name, || store.retry(d.clone())).await;
            let changed = sub.health.failure(
                Failure {
                    time: now,
                    http_status: Some(410),
                    message: "HTTP 410 Gone: the endpoint asked to stop deliveries".into(),
                },
                Some("the endpoint answered 410 Gone".into()),
            );
            ("gone", "4xx", changed)
        }
        Outcome::Failed {
            status,
            message,
            retry_after,
        } => {
            debug!(subscription = config.name, %message, attempts = d.attempts, "delivery failed");
            let failing_for = sub
                .health
                .failing_since()
                .map(|t| now.duration_since(t))
                .unwrap_or_default();
            let disable = (failing_for
                > jiff::SignedDuration::try_from(config.disable_after).unwrap_or(jiff::SignedDuration::MAX))
            .then(|| {
                format!(
                    "failing for longer than delivery.disableAfter ({}s)",
                    config.disable_after.as_secs()
                )
            });
            let changed = sub.health.failure(
                Failure {
                    time: now,
                    http_status: status,
                    message: message.clone(),
                },
                disable,
            );
            let policy = retry::Policy {
                schedule: &config.retry_schedule,
                max_event_age: config.max_event_age,
                max_retry_after: config.max_retry_after,
            };
            match retry::after_failure(policy, d.attempts, retry_after, d.accepted_at, now, retry::jitter()) {
                Next::RetryAt(at) => {
                    d.not_before = at;
                    store_write(metrics, "retry", name, || store.retry(d.clone())).await;
                }
                Next::DeadLetter(reason) => {
                    let reason = format!("{reason}; last error: {message}");
                    store_write(metrics, "dead_letter", name, || {
                        store.dead_letter(d.clone(), reason.clone())
                    })
                    .await;
                }
            }
            ("failure", status_class(status), changed)
        }
    };
    if status_label == "2xx" && outcome_label == "success" {
        sub.success.0.inc();
        sub.success.1.observe(elapsed.as_secs_f64());
    } else {
        deliveries
            .metrics
            .delivery(&config.namespace, &config.name, outcome_label, status_label, elapsed);
    }
    if changed {
        deliveries.health_changed.notify_one();
    }
    shard.wake.notify_one();
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

    /// A failing store write is tried again with backoff and counted each time; one that
    /// keeps failing is given up (the delivery then waits for a restart), never looped on.
    #[tokio::test(start_paused = true)]
    async fn store_writes_are_retried_counted_and_bounded() {
        let metrics = Metrics::new().expect("metrics");
        let mut calls = 0;
        let got = store_write(&metrics, "retry", "siem", || {
            calls += 1;
            if calls < 3 {
                Err(StoreError::Io("disk full".into()))
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
