//! The Go-style durations the API uses (`10s`, `1m30s`, `2h`, `0.5s`); the CRD's CEL
//! rules already refuse other shapes, this turns them into `std::time::Duration`.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration: use a number and a unit (ms, s, m, h), e.g. 10s or 1m30s")]
pub struct DurationError(pub String);

pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let bad = || DurationError(text.to_string());
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let (num, tail) = rest.split_at(num_len);
        let value: f64 = num.parse().map_err(|_| bad())?;
        let (unit_secs, unit_len) = if tail.starts_with("ms") {
            (0.001, 2)
        } else if tail.starts_with('s') {
            (1.0, 1)
        } else if tail.starts_with('m') {
            (60.0, 1)
        } else if tail.starts_with('h') {
            (3600.0, 1)
        } else {
            return Err(bad());
        };
        total += value * unit_secs;
        rest = &tail[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// A lower time bound given either as an RFC 3339 time or as a duration back from `now`
/// (`2h` = the last two hours).
pub fn parse_since(text: &str, now: jiff::Timestamp) -> Result<jiff::Timestamp, String> {
    if let Ok(t) = text.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    let age = parse_duration(text)
        .map_err(|_| format!("{text:?} is neither an RFC 3339 time (2026-11-26T08:00:00Z) nor a duration (2h, 30m)"))?;
    Ok(jiff::SignedDuration::try_from(age)
        .ok()
        .and_then(|age| now.checked_sub(age).ok())
        .unwrap_or(jiff::Timestamp::MIN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_style_durations() {
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
    }

    #[test]
    fn refuses_other_shapes() {
        for bad in ["", "10", "-5s", "5 s", "5d", "s", "1..2s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn since_is_a_time_or_a_duration_back_from_now() {
        let now: jiff::Timestamp = "2026-11-26T12:00:00Z".parse().expect("time");
        assert_eq!(
            parse_since("2h", now),
            Ok("2026-11-26T10:00:00Z".parse().expect("time"))
        );
        assert_eq!(
            parse_since("2026-11-01T00:00:00Z", now),
            Ok("2026-11-01T00:00:00Z".parse().expect("time"))
        );
        assert!(parse_since("yesterday", now).unwrap_err().contains("RFC 3339"));
    }
}
