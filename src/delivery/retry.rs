//! When to try a failed delivery again, or give up. Pure.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    RetryAt(jiff::Timestamp),
    DeadLetter(String),
}

/// After `attempts` attempts (the last one failed), the next step. `schedule[k]` is the
/// delay before attempt k+1; `retry_after` (from a 429/503) can only lengthen it.
pub fn after_failure(
    schedule: &[Duration],
    attempts: u32,
    retry_after: Option<Duration>,
    accepted_at: jiff::Timestamp,
    max_event_age: Duration,
    now: jiff::Timestamp,
) -> Next {
    let Some(delay) = schedule.get(attempts as usize) else {
        return Next::DeadLetter(format!("retries exhausted after {attempts} attempts"));
    };
    let delay = retry_after.map_or(*delay, |r| r.max(*delay));
    let at = now
        .checked_add(jiff::SignedDuration::try_from(delay).unwrap_or(jiff::SignedDuration::MAX))
        .unwrap_or(jiff::Timestamp::MAX);
    let deadline = accepted_at
        .checked_add(jiff::SignedDuration::try_from(max_event_age).unwrap_or(jiff::SignedDuration::MAX))
        .unwrap_or(jiff::Timestamp::MAX);
    if at > deadline {
        return Next::DeadLetter(format!(
            "the next attempt would be past maxEventAge ({}s)",
            max_event_age.as_secs()
        ));
    }
    Next::RetryAt(at)
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

    #[test]
    fn follows_the_schedule_then_dead_letters() {
        let schedule = [S(0), S(5), S(300)];
        assert_eq!(
            after_failure(&schedule, 1, None, at(0), S(3600), at(10)),
            Next::RetryAt(at(15))
        );
        assert_eq!(
            after_failure(&schedule, 2, None, at(0), S(3600), at(10)),
            Next::RetryAt(at(310))
        );
        assert!(
            matches!(after_failure(&schedule, 3, None, at(0), S(3600), at(10)), Next::DeadLetter(m) if m.contains("3 attempts"))
        );
    }

    #[test]
    fn retry_after_lengthens_and_max_age_caps() {
        let schedule = [S(0), S(5)];
        assert_eq!(
            after_failure(&schedule, 1, Some(S(60)), at(0), S(3600), at(0)),
            Next::RetryAt(at(60))
        );
        assert_eq!(
            after_failure(&schedule, 1, Some(S(1)), at(0), S(3600), at(0)),
            Next::RetryAt(at(5))
        );
        assert!(
            matches!(after_failure(&schedule, 1, None, at(0), S(3), at(0)), Next::DeadLetter(m) if m.contains("maxEventAge"))
        );
    }

    #[test]
    fn parses_retry_after_forms() {
        assert_eq!(parse_retry_after("120", at(0)), Some(S(120)));
        assert_eq!(parse_retry_after("Thu, 01 Jan 1970 00:01:40 GMT", at(40)), Some(S(60)));
        assert_eq!(parse_retry_after("soon", at(0)), None);
    }
}
