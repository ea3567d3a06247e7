//! The raw message door of the history API: `GET /v1/raw-messages/{sha256}` with a link
//! the delivery path signed (`archive::RawLinks`). The link is the credential: it needs
//! no token, so a receiver can fetch the message it was told about, and nothing else,
//! until the link expires or its subscription or grant goes away. Depends on the archive,
//! the store and the delivery registry.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::archive::{LinkError, LinkTo, RawLinks};
use crate::delivery::{Deliveries, RawLinkRefused};

#[derive(Clone)]
struct ArchiveState {
    links: Arc<RawLinks>,
    deliveries: Arc<Deliveries>,
}

#[derive(Deserialize)]
struct LinkQuery {
    #[serde(default)]
    subscription: String,
    #[serde(default)]
    mailbox: String,
    #[serde(default, rename = "type")]
    event_type: String,
    #[serde(default)]
    expires: String,
    #[serde(default)]
    signature: String,
}

pub fn router(links: Arc<RawLinks>, deliveries: Arc<Deliveries>) -> Router {
    Router::new()
        .route("/v1/raw-messages/{sha256}", get(raw_message))
        .with_state(ArchiveState { links, deliveries })
}

fn refuse(status: StatusCode, message: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

async fn raw_message(
    State(state): State<ArchiveState>,
    Path(sha256): Path<String>,
    Query(q): Query<LinkQuery>,
) -> Response {
    let to = LinkTo {
        sha256: &sha256,
        subscription: &q.subscription,
        mailbox: &q.mailbox,
        event_type: &q.event_type,
    };
    match state
        .links
        .verify(&to, &q.expires, &q.signature, jiff::Timestamp::now())
    {
        Ok(()) => {}
        Err(err @ LinkError::BadSignature) => return refuse(StatusCode::FORBIDDEN, err.to_string()),
        Err(err @ LinkError::Expired(_)) => return refuse(StatusCode::GONE, err.to_string()),
    }
    if let Err(err) = state.deliveries.raw_link_allowed(&to) {
        let status = match err {
            RawLinkRefused::Grant => StatusCode::FORBIDDEN,
            RawLinkRefused::Subscription => StatusCode::NOT_FOUND,
        };
        return refuse(status, err.to_string());
    }
    let (store, trail, id) = (state.deliveries.archive(), state.deliveries.audit(), sha256.clone());
    let subscription = q.subscription.clone();
    // Every fetch is an act of custody, logged before a byte is sent.
    let found = tokio::task::spawn_blocking(move || {
        let Some(found) = store.raw_message(&id)? else {
            return Ok(None);
        };
        trail.audit_append(&crate::audit::Record::Custody {
            action: "raw-message.fetch".into(),
            subject: format!("raw-message/{id}"),
            by: format!("subscription:{subscription}"),
            at: jiff::Timestamp::now(),
            detail: format!("{} bytes, by its link", found.1.len()),
        })?;
        Ok::<_, crate::store::StoreError>(Some(found))
    })
    .await;
    match found {
        Ok(Ok(Some((_, bytes)))) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "message/rfc822".to_string()),
                (header::CACHE_CONTROL, "no-store".to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{sha256}.eml\""),
                ),
            ],
            bytes,
        )
            .into_response(),
        Ok(Ok(None)) => refuse(
            StatusCode::NOT_FOUND,
            "the raw message is no longer archived (past --raw-message-retention)".into(),
        ),
        Ok(Err(err)) => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read the archive: {err}"),
        ),
        Err(err) => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the archive stopped: {err}"),
        ),
    }
}
