//! Dead-letter replay asked for through the `mailhook.io/replay-requested-at` annotation:
//! whether one is pending (pure), and carrying it out through the data path.

use std::collections::BTreeMap;

use kube::Resource;
use kube::runtime::events::EventType as K8sEventType;
use tracing::info;

use crate::api::{REPLAY_REQUESTED_AT, REPLAY_SINCE, ReplayStatus, WebhookSubscription, parse_since};
use crate::controller::Context;
use crate::store::StoreError;

/// Why a replay could not be carried out; retried.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("the store refused the replay")]
    Store(#[from] StoreError),
    #[error("the replay task stopped unexpectedly")]
    Task(#[from] tokio::task::JoinError),
}

/// A replay asked for through the annotations and not handled yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRequest {
    pub token: String,
    /// The lower bound, or why the `mailhook.io/replay-since` value is unusable.
    pub since: Result<Option<jiff::Timestamp>, String>,
}

/// Whether the annotations ask for a replay that `handled` (the last token answered)
/// has not answered yet. Pure.
pub fn replay_request(
    annotations: &BTreeMap<String, String>,
    handled: Option<&str>,
    now: jiff::Timestamp,
) -> Option<ReplayRequest> {
    let token = annotations.get(REPLAY_REQUESTED_AT)?;
    if token.is_empty() || handled == Some(token.as_str()) {
        return None;
    }
    let since = match annotations.get(REPLAY_SINCE) {
        None => Ok(None),
        Some(text) => parse_since(text, now)
            .map(Some)
            .map_err(|e| format!("annotation {REPLAY_SINCE}: {e}")),
    };
    Some(ReplayRequest {
        token: token.clone(),
        since,
    })
}

/// Carries out a replay request; the outcome goes on status and in an Event.
pub async fn replay(
    ctx: &Context,
    whs: &WebhookSubscription,
    uid: &str,
    request: ReplayRequest,
) -> Result<ReplayStatus, ReplayError> {
    let now = jiff::Timestamp::now();
    let (replayed, since, message, ok) = match request.since {
        Err(problem) => (0, None, format!("Nothing replayed: {problem}."), false),
        Ok(since) => {
            let deliveries = ctx.deliveries.clone();
            let id = uid.to_string();
            let from = since.unwrap_or(jiff::Timestamp::MIN);
            let n = tokio::task::spawn_blocking(move || deliveries.replay(&id, from)).await??;
            let bound = since.map(|s| format!(" given up since {s}")).unwrap_or_default();
            (
                n,
                since,
                format!("Queued {n} dead letter(s){bound} for delivery again."),
                true,
            )
        }
    };
    info!(
        token = request.token,
        replayed, "dead-letter replay requested by annotation"
    );
    let kind = if ok {
        K8sEventType::Normal
    } else {
        K8sEventType::Warning
    };
    let reason = if ok { "Replayed" } else { "ReplayRefused" };
    ctx.publish(&whs.object_ref(&()), kind, reason, &message).await;
    Ok(ReplayStatus {
        requested_at: request.token,
        handled_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now),
        replayed,
        since: since.map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_is_requested_once_per_token() {
        let now = jiff::Timestamp::UNIX_EPOCH;
        let annotations = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert_eq!(replay_request(&annotations(&[]), None, now), None);
        let asked = annotations(&[(REPLAY_REQUESTED_AT, "t1")]);
        let request = replay_request(&asked, None, now).expect("requested");
        assert_eq!((request.token.as_str(), request.since), ("t1", Ok(None)));
        assert_eq!(replay_request(&asked, Some("t1"), now), None, "already handled");
        assert!(replay_request(&asked, Some("t0"), now).is_some(), "a new token");
        assert_eq!(
            replay_request(&annotations(&[(REPLAY_REQUESTED_AT, "")]), None, now),
            None
        );
        let bad = annotations(&[(REPLAY_REQUESTED_AT, "t2"), (REPLAY_SINCE, "yesterday-ish")]);
        let request = replay_request(&bad, None, now).expect("requested");
        assert!(
            request
                .since
                .as_ref()
                .is_err_and(|e| e.starts_with("annotation mailhook.io/replay-since")),
            "{:?}",
            request.since
        );
    }
}
