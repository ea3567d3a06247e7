//! Per-subscription delivery health: what the status writer puts on the resource.

use std::collections::VecDeque;

use parking_lot::Mutex;

use super::verification::Verification;

/// The most recent failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub time: jiff::Timestamp,
    pub http_status: Option<u16>,
    pub message: String,
    /// The endpoint's `Retry-After` (capped by `delivery.maxRetryAfter`): no probe before.
    pub not_before: Option<jiff::Timestamp>,
}

/// Health at one moment. Counters count since this process started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthSnapshot {
    pub delivered: u64,
    pub failed_attempts: u64,
    pub consecutive_failures: u32,
    pub last_success: Option<jiff::Timestamp>,
    pub last_failure: Option<Failure>,
    pub failing_since: Option<jiff::Timestamp>,
    /// Why deliveries stopped (410 Gone, failing longer than disableAfter).
    pub disabled: Option<String>,
    /// Median of recent successful deliveries.
    pub latency_p50_ms: Option<u64>,
    /// The endpoint verification handshake (`endpoint.verify`) of the current URL; None
    /// when the subscription does not ask for one.
    pub verification: Option<Verification>,
}

/// The coarse state that, when it changes, is written to status at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthClass {
    Unknown,
    Healthy,
    Failing,
    Disabled,
}

impl HealthSnapshot {
    pub fn class(&self) -> HealthClass {
        if self.disabled.is_some() {
            HealthClass::Disabled
        } else if self.consecutive_failures > 0 {
            HealthClass::Failing
        } else if self.last_success.is_some() {
            HealthClass::Healthy
        } else {
            HealthClass::Unknown
        }
    }
}

const LATENCY_WINDOW: usize = 64;

/// While an endpoint fails, it gets one request at a time and at most one per this
/// interval (a probe); the rest of its backlog waits with its attempts unspent. Without it
/// every due delivery failed in turn, which took CPU and connections from the healthy
/// endpoints (`failing-10pct` in BENCHMARKS.md).
pub const PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The probe interval of a retry schedule: PROBE_INTERVAL, or the schedule's shortest
/// non-zero wait when that is shorter (who asks for sub-second retries gets them), or none
/// when every entry is `0s` (still one request at a time). Pure.
pub fn probe_interval(schedule: &[std::time::Duration]) -> std::time::Duration {
    if !schedule.is_empty() && schedule.iter().all(|d| d.is_zero()) {
        return std::time::Duration::ZERO;
    }
    schedule
        .iter()
        .copied()
        .filter(|d| !d.is_zero())
        .fold(PROBE_INTERVAL, std::cmp::Ord::min)
}

#[derive(Default)]
pub struct Health {
    inner: Mutex<(HealthSnapshot, VecDeque<u64>)>,
}

impl Health {
    pub fn snapshot(&self) -> HealthSnapshot {
        let guard = self.inner.lock();
        let mut snapshot = guard.0.clone();
        let mut sorted: Vec<u64> = guard.1.iter().copied().collect();
        sorted.sort_unstable();
        snapshot.latency_p50_ms = sorted.get(sorted.len() / 2).copied();
        snapshot
    }

    /// Whether deliveries are stopped; cheaper than a snapshot, for the shard loop.
    pub fn is_disabled(&self) -> bool {
        self.inner.lock().0.disabled.is_some()
    }

    /// When a failing endpoint may be tried again (one request; `interval` from
    /// `probe_interval`); None when it is not failing. The wait is measured from the last
    /// failure but never ends later than that wait from `now`: a failure time ahead of this
    /// clock (a step back, another replica's clock) must not hold the endpoint for the skew.
    pub fn probe_at(&self, interval: std::time::Duration, now: jiff::Timestamp) -> Option<jiff::Timestamp> {
        let guard = self.inner.lock();
        if guard.0.consecutive_failures == 0 {
            return None;
        }
        guard.0.last_failure.as_ref().map(|f| {
            let at = (f.time + interval).max(f.not_before.unwrap_or(f.time));
            at.min(now.checked_add(at.duration_since(f.time)).unwrap_or(at))
        })
    }

    /// When the current run of failures began, if failing.
    pub fn failing_since(&self) -> Option<jiff::Timestamp> {
        self.inner.lock().0.failing_since
    }

    /// Records a successful request of `events` events (several when batched); returns
    /// true when the health class changed.
    pub fn success(&self, now: jiff::Timestamp, latency_ms: u64, events: u64) -> bool {
        self.update(|s, window| {
            s.delivered += events;
            s.consecutive_failures = 0;
            s.failing_since = None;
            s.last_success = Some(now);
            if window.len() == LATENCY_WINDOW {
                window.pop_front();
            }
            window.push_back(latency_ms);
        })
    }

    /// Records a failed attempt; disables the endpoint when `disable` is given.
    /// `events`: the deliveries the failed request carried, each a failed attempt.
    pub fn failure(&self, failure: Failure, disable: Option<String>, events: u64) -> bool {
        self.update(|s, _| {
            s.failed_attempts += events;
            s.consecutive_failures += 1;
            s.failing_since.get_or_insert(failure.time);
            s.last_failure = Some(failure);
            if disable.is_some() {
                s.disabled = disable;
            }
        })
    }

    /// Lets deliveries flow again (the subscription was edited).
    pub fn enable(&self) -> bool {
        self.update(|s, _| {
            s.disabled = None;
            s.consecutive_failures = 0;
            s.failing_since = None;
        })
    }

    /// Records where the verification handshake stands; true when that changed.
    pub fn set_verification(&self, verification: Option<Verification>) -> bool {
        let mut guard = self.inner.lock();
        let changed = guard.0.verification != verification;
        guard.0.verification = verification;
        changed
    }

    /// Whether deliveries wait for the endpoint to be verified.
    pub fn awaits_verification(&self) -> bool {
        self.inner
            .lock()
            .0
            .verification
            .as_ref()
            .is_some_and(|v| *v != Verification::Verified)
    }

    fn update(&self, f: impl FnOnce(&mut HealthSnapshot, &mut VecDeque<u64>)) -> bool {
        let mut guard = self.inner.lock();
        let before = guard.0.class();
        let (snapshot, window) = &mut *guard;
        f(snapshot, window);
        before != guard.0.class()
    }
}

/// A subscription's health and queue figures as the owner of its shard publishes them
/// through a shared store, for the leader to write on the resource.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Published {
    pub delivered: u64,
    pub failed_attempts: u64,
    pub consecutive_failures: u32,
    pub last_success: Option<jiff::Timestamp>,
    pub last_failure_time: Option<jiff::Timestamp>,
    pub last_failure_status: Option<u16>,
    pub last_failure_message: Option<String>,
    pub failing_since: Option<jiff::Timestamp>,
    pub disabled: Option<String>,
    pub latency_p50_ms: Option<u64>,
    pub backlog: u64,
    pub dead_lettered: u64,
    /// Bytes of the backlog's events.
    pub backlog_bytes: u64,
    /// When the oldest delivery of the backlog was accepted.
    pub oldest_accepted: Option<jiff::Timestamp>,
    /// Deliveries dead-lettered at a full backlog, since the owner started.
    pub overflowed: u64,
    pub shard: u32,
    /// The last dead-letter replay the owner carried out (the API's `ReplayStatus`).
    pub last_replay: Option<serde_json::Value>,
}

impl Published {
    pub fn new(h: &HealthSnapshot, counts: crate::store::QueueCounts, shard: u32) -> Published {
        Published {
            delivered: h.delivered,
            failed_attempts: h.failed_attempts,
            consecutive_failures: h.consecutive_failures,
            last_success: h.last_success,
            last_failure_time: h.last_failure.as_ref().map(|f| f.time),
            last_failure_status: h.last_failure.as_ref().and_then(|f| f.http_status),
            last_failure_message: h.last_failure.as_ref().map(|f| f.message.clone()),
            failing_since: h.failing_since,
            disabled: h.disabled.clone(),
            latency_p50_ms: h.latency_p50_ms,
            backlog: counts.backlog,
            dead_lettered: counts.dead_lettered,
            backlog_bytes: counts.bytes,
            oldest_accepted: counts.oldest_accepted,
            overflowed: counts.overflowed,
            shard,
            last_replay: None,
        }
    }

    pub fn snapshot(&self) -> HealthSnapshot {
        HealthSnapshot {
            delivered: self.delivered,
            failed_attempts: self.failed_attempts,
            consecutive_failures: self.consecutive_failures,
            last_success: self.last_success,
            last_failure: self.last_failure_time.map(|time| Failure {
                time,
                http_status: self.last_failure_status,
                message: self.last_failure_message.clone().unwrap_or_default(),
                not_before: None,
            }),
            failing_since: self.failing_since,
            disabled: self.disabled.clone(),
            latency_p50_ms: self.latency_p50_ms,
            verification: None,
        }
    }

    pub fn counts(&self) -> crate::store::QueueCounts {
        crate::store::QueueCounts {
            backlog: self.backlog,
            in_flight: 0,
            dead_lettered: self.dead_lettered,
            bytes: self.backlog_bytes,
            oldest_accepted: self.oldest_accepted,
            overflowed: self.overflowed,
        }
    }
}

impl Health {
    /// Takes over what the shard's previous owner published, when this replica has
    /// recorded nothing for the subscription yet: counters go on from there.
    pub fn seed(&self, p: &Published) {
        let mut guard = self.inner.lock();
        let s = &mut guard.0;
        if s.delivered > 0 || s.failed_attempts > 0 {
            return;
        }
        let verification = s.verification.take();
        *s = p.snapshot();
        s.latency_p50_ms = None;
        s.verification = verification;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn failure(time: jiff::Timestamp) -> Failure {
        Failure {
            time,
            http_status: Some(503),
            message: "503".into(),
            not_before: None,
        }
    }

    #[test]
    fn a_failing_endpoint_is_probed_once_its_interval_has_passed() {
        let health = Health::default();
        let t = jiff::Timestamp::from_second(1_800_000_000).expect("time");
        assert_eq!(
            health.probe_at(PROBE_INTERVAL, t),
            None,
            "not failing: no probe, all slots"
        );
        health.failure(failure(t), None, 1);
        assert_eq!(health.probe_at(PROBE_INTERVAL, t), Some(t + PROBE_INTERVAL));
        assert_eq!(health.probe_at(Duration::ZERO, t), Some(t));
        // A Retry-After further out than the interval: no probe before it.
        let asked = t + Duration::from_secs(60);
        health.failure(
            Failure {
                not_before: Some(asked),
                ..failure(t)
            },
            None,
            1,
        );
        assert_eq!(health.probe_at(PROBE_INTERVAL, t), Some(asked));
        // A failure stamped an hour ahead of this clock waits the interval, not the hour.
        let ahead = t + Duration::from_secs(3600);
        health.failure(failure(ahead), None, 1);
        assert_eq!(health.probe_at(PROBE_INTERVAL, t), Some(t + PROBE_INTERVAL));
        health.success(t, 3, 1);
        assert_eq!(health.probe_at(PROBE_INTERVAL, t), None, "one success lifts it");
    }

    #[test]
    fn the_probe_interval_is_a_second_unless_the_schedule_asks_for_shorter() {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        // The default schedule starts with 0s: that entry retries one delivery at once, it
        // does not ask for a failing endpoint to be hammered.
        assert_eq!(probe_interval(&[s(0), s(5), s(300)]), PROBE_INTERVAL);
        assert_eq!(probe_interval(&[s(30)]), PROBE_INTERVAL);
        assert_eq!(probe_interval(&[s(0), ms(100), ms(200)]), ms(100));
        assert_eq!(probe_interval(&[s(0), s(0)]), Duration::ZERO);
        assert_eq!(probe_interval(&[]), PROBE_INTERVAL, "no retries: a probe a second");
    }
}
