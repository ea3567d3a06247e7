//! When to try a failed delivery again, or give up. Pure.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    RetryAt(jiff::Timestamp),
    DeadLetter(String),
}

/// A subscription's retry settings.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// `schedule[k]` is the longest delay before attempt k+1.
    pub schedule: &'a [Duration],
    pub max_event_age: Duration,
    /// Longest `Retry-After` honoured (`delivery.maxRetryAfter`): a hostile or broken
    /// endpoint cannot park deliveries for days.
    pub max_retry_after: Duration,
}

/// After `attempts` attempts (the last one failed), the next step.
///
/// Full jitter: the delay is `jitter` (uniform in [0, 1]) times the schedule's entry, so
/// many subscriptions failing at once do not retry in lock-step. A `Retry-After` (from a
/// 429/503), capped at `max_retry_after`, is a floor under it.
pub fn after_failure(
    policy: Policy<'_>,
    attempts: u32,
    retry_after: Option<Duration>,
    accepted_at: jiff::Timestamp,
    now: jiff::Timestamp,
    jitter: f64,
) -> Next {
    let Some(delay) = policy.schedule.get(attempts as usize) else {
        return Next::DeadLetter(format!("retries exhausted after {attempts} attempts"));
    };
    let jittered = delay.mul_f64(jitter.clamp(0.0, 1.0));
    let delay = retry_after.map_or(jittered, |r| r.min(policy.max_retry_after).max(jittered));
    let at = now
        .checked_add(jiff::SignedDuration::try_from(delay).unwrap_or(jiff::SignedDuration::MAX))
        .unwrap_or(jiff::Timestamp::MAX);
    let deadline = accepted_at
        .checked_add(jiff::SignedDuration::try_from(policy.max_event_age).unwrap_or(jiff::SignedDuration::MAX))
        .unwrap_or(jiff::Timestamp::MAX);
    if at > deadline {
        return Next::DeadLetter(format!(
            "the next attempt would be past maxEventAge ({}s)",
            policy.max_event_age.as_secs()
        ));
    }
    Next::RetryAt(at)
}

/// A uniform random fraction in [0, 1] for `after_failure`.
pub fn jitter() -> f64 {
    f64::from(getrandom::u32().unwrap_or(u32::MAX)) / f64::from(u32::MAX)
}

/// Parses `Retry-After`: seconds, or an HTTP date.
pub fn parse_retry_after(value: &str, now: jiff::Timestamp) -> Option<Duration> {
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = jiff::fmt::rfc2822::parse(value.trim()).ok()?.timestamp();
    Some(Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(s).expect("valid")
    }
    const S: fn(u64) -> Duration = Duration::from_secs;

    fn policy(schedule: &[Duration], max_event_age: Duration) -> Policy<'_> {
        Policy {
            schedule,
            max_event_age,
            max_retry_after: S(3600),
        }
    }

    #[test]
    fn follows_the_schedule_then_dead_letters() {
        let schedule = [S(0), S(5), S(300)];
        let p = policy(&schedule, S(3600));
        assert_eq!(after_failure(p, 1, None, at(0), at(10), 1.0), Next::RetryAt(at(15)));
        assert_eq!(after_failure(p, 2, None, at(0), at(10), 1.0), Next::RetryAt(at(310)));
        assert!(
            matches!(after_failure(p, 3, None, at(0), at(10), 1.0), Next::DeadLetter(m) if m.contains("3 attempts"))
        );
    }

    #[test]
    fn retry_after_lengthens_and_max_age_caps() {
        let schedule = [S(0), S(5)];
        let p = policy(&schedule, S(3600));
        assert_eq!(
            after_failure(p, 1, Some(S(60)), at(0), at(0), 1.0),
            Next::RetryAt(at(60))
        );
        assert_eq!(after_failure(p, 1, Some(S(1)), at(0), at(0), 1.0), Next::RetryAt(at(5)));
        assert!(
            matches!(after_failure(policy(&schedule, S(3)), 1, None, at(0), at(0), 1.0), Next::DeadLetter(m) if m.contains("maxEventAge"))
        );
    }

    #[test]
    fn full_jitter_spreads_delays_and_retry_after_is_a_floor() {
        let schedule = [S(0), S(100)];
        let p = policy(&schedule, S(3600));
        assert_eq!(after_failure(p, 1, None, at(0), at(0), 0.0), Next::RetryAt(at(0)));
        assert_eq!(after_failure(p, 1, None, at(0), at(0), 0.25), Next::RetryAt(at(25)));
        // Out-of-range fractions are clamped, never beyond the schedule.
        assert_eq!(after_failure(p, 1, None, at(0), at(0), 7.0), Next::RetryAt(at(100)));
        // Jitter never shortens what the endpoint asked for.
        assert_eq!(
            after_failure(p, 1, Some(S(60)), at(0), at(0), 0.1),
            Next::RetryAt(at(60))
        );
        // The random fraction is in range and not constant.
        let draws: Vec<f64> = (0..64).map(|_| jitter()).collect();
        assert!(draws.iter().all(|j| (0.0..=1.0).contains(j)));
        assert!(draws.iter().any(|j| *j != draws[0]));
    }

    #[test]
    fn retry_after_is_capped_at_max_retry_after() {
        let schedule = [S(0), S(5)];
        let p = Policy {
            schedule: &schedule,
            max_event_age: S(30 * 86400),
            max_retry_after: S(3600),
        };
        // An endpoint asking for a week is retried after an hour.
        assert_eq!(
            after_failure(p, 1, Some(S(7 * 86400)), at(0), at(0), 1.0),
            Next::RetryAt(at(3600))
        );
    }

    #[test]
    fn parses_retry_after_forms() {
        assert_eq!(parse_retry_after("120", at(0)), Some(S(120)));
        assert_eq!(parse_retry_after("Thu, 01 Jan 1970 00:01:40 GMT", at(40)), Some(S(60)));
        assert_eq!(parse_retry_after("soon", at(0)), None);
    }
}
