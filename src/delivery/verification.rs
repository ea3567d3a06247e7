//! Endpoint verification (opt-in, `endpoint.verify`): before a subscription delivers, its
//! endpoint must prove it wants the traffic by echoing a random challenge, in the spirit
//! of Microsoft Graph's validationToken handshake. It keeps a namespace user from aiming
//! someone else's compliance data (or a flood of requests) at a server that never asked
//! for it.
//!
//! The request is signed like any delivery: a POST of
//! `{"type": "endpoint.verification", "timestamp", "data": {"challenge", "subscription"}}`.
//! The endpoint answers 2xx with `{"challenge": "<the same value>"}` (or the bare value).

use base64::Engine;
use serde::Serialize;

use super::wire::{self, Format, Request};
use super::{DeliveryConfig, signed_post, webhook_id};
use crate::crypto::constant_time_eq;

/// Where a subscription's verification handshake stands, for its current URL. The data
/// path runs it before a subscription's first delivery and, while it fails, every `RETRY`;
/// the status writer shows it on `Ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// Not answered yet.
    Pending,
    /// The endpoint did not echo the challenge: why, for the person who runs it.
    Failed(String),
    Verified,
}

/// How often an endpoint that did not echo the challenge is asked again.
pub const RETRY: std::time::Duration = std::time::Duration::from_secs(10);

/// The handshake of one subscription: for which URL, where it stands, when to try again.
pub(super) struct Handshake {
    /// Which configuration this is (a new URL is a new handshake).
    pub(super) attempt: u64,
    pub(super) url: String,
    pub(super) state: Verification,
    pub(super) in_flight: bool,
    pub(super) next_try: std::time::Instant,
}

impl Handshake {
    pub(super) fn new(url: &str) -> Handshake {
        Handshake {
            attempt: 0,
            url: url.to_string(),
            state: Verification::Pending,
            in_flight: false,
            next_try: std::time::Instant::now(),
        }
    }
}

#[derive(Serialize)]
struct Challenge<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    timestamp: String,
    data: ChallengeData<'a>,
}

/// The `data` of an `endpoint.verification` request.
#[derive(Serialize, schemars::JsonSchema)]
pub struct ChallengeData<'a> {
    /// Echo this back as `{"challenge": "<value>"}` in a 2xx answer.
    challenge: &'a str,
    /// `namespace/name` of the subscription being verified.
    subscription: String,
}

/// The event type of the challenge.
pub const KIND: &str = "endpoint.verification";

/// Largest verification answer read.
const MAX_ANSWER: usize = 4096;

/// Whether `body` echoes `challenge`: as `{"challenge": ...}` or as the bare value.
pub fn echoes(body: &[u8], challenge: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Echo {
        challenge: String,
    }
    if let Ok(echo) = serde_json::from_slice::<Echo>(body) {
        return constant_time_eq(echo.challenge.as_bytes(), challenge.as_bytes());
    }
    std::str::from_utf8(body).is_ok_and(|t| constant_time_eq(t.trim().as_bytes(), challenge.as_bytes()))
}

/// Sends the challenge to the endpoint; Ok when it echoed it, else why not, phrased for
/// the person who runs the endpoint.
pub async fn handshake(config: &DeliveryConfig) -> Result<(), String> {
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(crate::crypto::random_bytes());
    let now = jiff::Timestamp::now();
    let data = ChallengeData {
        challenge: &challenge,
        subscription: format!("{}/{}", config.namespace, config.name),
    };
    let id = webhook_id(&format!("verification-{challenge}"), &config.uid);
    let request = match config.wire.format {
        Format::StandardWebhooks => Request {
            id,
            content_type: "application/json",
            headers: Vec::new(),
            body: serde_json::to_vec(&Challenge {
                kind: KIND,
                timestamp: now.to_string(),
                data,
            })
            .map_err(|e| format!("cannot build the challenge: {e}"))?,
        },
        Format::CloudEvents { structured } => {
            let data = serde_json::to_vec(&data).map_err(|e| format!("cannot build the challenge: {e}"))?;
            wire::operator_event(&config.wire, id, KIND, now, &data, structured)
        }
    };
    let url = reqwest::Url::parse(&config.url).map_err(|e| format!("endpoint.url does not parse: {e}"))?;
    let response = signed_post(config, url, request)
        .send()
        .await
        .map_err(|e| format!("the verification request failed: {}", super::root_cause(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!(
            "the endpoint answered the verification request with HTTP {}",
            status.as_u16()
        ));
    }
    // The echo is small: read at most MAX_ANSWER bytes, so an endpoint cannot make the
    // operator buffer an endless answer.
    let mut response = response;
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("the verification answer could not be read: {e}"))?
    {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_ANSWER {
            return Err(format!(
                "the verification answer is over {MAX_ANSWER} bytes; echo only the challenge"
            ));
        }
    }
    if echoes(&body, &challenge) {
        Ok(())
    } else {
        Err("the endpoint answered 2xx but did not echo the challenge".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_challenge_counts_as_an_echo() {
        assert!(echoes(br#"{"challenge": "abc"}"#, "abc"));
        assert!(echoes(b"abc\n", "abc"));
        assert!(!echoes(br#"{"challenge": "abd"}"#, "abc"));
        assert!(!echoes(b"{}", "abc"));
        assert!(!echoes(b"", "abc"));
        assert!(!echoes(b"abcd", "abc"));
    }
}
