//! The history API, served on the admin port: a subscription's delivery attempts and
//! dead letters, and replaying them (`client` is the CLI side of it); and links to
//! archived raw messages (`raw`). Every route but the signed raw-message links needs
//! `Authorization: Bearer <token>`: a token from `--admin-token-file` acts on every
//! namespace; any other is a Kubernetes token, allowed what its user may do to the
//! WebhookSubscription in that namespace (`auth::kubernetes`: `get` to list, `patch` to
//! replay).
//! Depends on the core (delivery, store, archive) and the shared handles only.
//!
//! - `GET  /v1/subscriptions/{namespace}/{name}/attempts?since=&limit=`
//! - `GET  /v1/subscriptions/{namespace}/{name}/dead-letters?since=&limit=`
//! - `POST /v1/subscriptions/{namespace}/{name}/replay?since=`
//!
//! `since` is an RFC 3339 time or a duration back from now (`2h`).

pub mod audit;
pub mod client;
pub mod raw;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::info;

use crate::api::parse_since;
use crate::auth::kubernetes::{Access, Decision, KubernetesAccess, Verb};
use crate::auth::{FailureLimit, Tokens, bearer};
use crate::delivery::Deliveries;
use crate::handles::Directory;
use crate::store::{Attempt, DeadLetter};

/// Most records one listing returns.
pub const MAX_LIMIT: usize = 10_000;
const DEFAULT_LIMIT: usize = 100;

/// What the history API reads and acts on.
#[derive(Clone)]
pub struct History {
    pub deliveries: Arc<Deliveries>,
    pub directory: Arc<Directory>,
    /// Tokens that act on every namespace (`--admin-token-file`).
    pub tokens: Option<Tokens>,
    /// Kubernetes tokens, judged per namespace; None: only admin tokens are taken.
    pub kubernetes: Option<Arc<KubernetesAccess>>,
    /// Failed authentications per client address, over both kinds of token.
    pub failures: Arc<FailureLimit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    since: Option<String>,
    limit: Option<usize>,
}

/// The subscription a response is about.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct AttemptList {
    pub subscription: SubscriptionRef,
    pub items: Vec<Attempt>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct DeadLetterList {
    pub subscription: SubscriptionRef,
    pub items: Vec<DeadLetter>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Replayed {
    pub subscription: SubscriptionRef,
    pub replayed: u64,
}

/// Every route of the history API: the token-guarded part, and the raw message links when
/// the archive is on.
pub fn router(
    history: History,
    raw_links: Option<Arc<crate::archive::RawLinks>>,
    audit: Option<audit::Audit>,
) -> Router {
    let deliveries = history.deliveries.clone();
    let mut app = api_router(history.clone());
    if let Some(audit) = audit {
        app = app.merge(audit::router(audit::AuditApi { audit, history }));
    }
    match raw_links {
        Some(links) => app.merge(raw::router(links, deliveries)),
        None => app,
    }
}

fn api_router(history: History) -> Router {
    Router::new()
        .route("/v1/subscriptions/{namespace}/{name}/attempts", get(attempts))
        .route("/v1/subscriptions/{namespace}/{name}/dead-letters", get(dead_letters))
        .route("/v1/subscriptions/{namespace}/{name}/replay", post(replay))
        .with_state(history)
}

/// A refused request: its status and a message for the person at the CLI.
struct Refusal(StatusCode, String);

fn refuse(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal(status, message.into())
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = (self.0, axum::Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
        }
        if self.0 == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The refusal of an address that sent too many unknown tokens lately.
fn locked_out(history: &History, peer: std::net::IpAddr, now: std::time::Instant) -> Option<Refusal> {
    let left = history.failures.locked(peer, now)?;
    Some(refuse(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "too many failed authentications from this address; try again in {} s",
            left.as_secs().max(1)
        ),
    ))
}

/// The name of the caller's token when it is one from `--admin-token-file`, the only kind
/// `what` takes; unknown tokens count towards the address's lockout.
fn admin_only(history: &History, headers: &HeaderMap, peer: std::net::IpAddr, what: &str) -> Result<Arc<str>, Refusal> {
    let now = std::time::Instant::now();
    let presented = bearer(headers).filter(|t| !t.is_empty());
    if let (Some(token), Some(tokens)) = (presented, &history.tokens)
        && let Some(name) = tokens.name_of(token)
    {
        return Ok(name);
    }
    if let Some(locked) = locked_out(history, peer, now) {
        return Err(locked);
    }
    if presented.is_some() {
        history.failures.failed(peer, now);
    }
    tracing::info!(%peer, "{what}: authentication failed");
    Err(refuse(
        StatusCode::UNAUTHORIZED,
        format!("{what} takes only a token from --admin-token-file: send Authorization: Bearer <token>"),
    ))
}

/// Whether the caller may `verb` the subscription `namespace/name`: an admin token may
/// anything; a Kubernetes token what its user may do to the resource.
async fn authorize(
    history: &History,
    headers: &HeaderMap,
    peer: std::net::IpAddr,
    namespace: &str,
    name: &str,
    verb: Verb,
) -> Result<(), Refusal> {
    let now = std::time::Instant::now();
    let presented = bearer(headers).filter(|t| !t.is_empty());
    // An admin token is checked before the lockout (it costs nothing), so clients sharing
    // an address with a guesser keep working; requests without a token are not counted.
    if let (Some(token), Some(tokens)) = (presented, &history.tokens)
        && tokens.accepts(token)
    {
        return Ok(());
    }
    let unauthenticated = |counted: bool| {
        if counted {
            history.failures.failed(peer, now);
        }
        tracing::info!(%peer, "history API: authentication failed");
        refuse(
            StatusCode::UNAUTHORIZED,
            "missing or unknown bearer token: send Authorization: Bearer <a Kubernetes token allowed to get the WebhookSubscription, or a token from --admin-token-file>",
        )
    };
    let Some(token) = presented else {
        return Err(unauthenticated(false));
    };
    // Each Kubernetes token costs a TokenReview: an address that sent many unknown ones
    // waits before the apiserver is asked again.
    if let Some(locked) = locked_out(history, peer, now) {
        return Err(locked);
    }
    let Some(kubernetes) = &history.kubernetes else {
        return Err(unauthenticated(true));
    };
    match kubernetes
        .decide(token, Access::Subscription { namespace, name, verb })
        .await
    {
        Ok(Decision::Allowed) => Ok(()),
        Ok(Decision::Unauthenticated) => Err(unauthenticated(true)),
        Ok(Decision::Denied(why)) => Err(refuse(StatusCode::FORBIDDEN, why)),
        Err(err) => {
            tracing::warn!(err = %crate::error_chain(&err), "history API: cannot judge a token");
            Err(refuse(StatusCode::SERVICE_UNAVAILABLE, err.to_string()))
        }
    }
}

/// Authenticates and authorizes, resolves the subscription and the bounds.
async fn resolve(
    history: &History,
    headers: &HeaderMap,
    peer: std::net::IpAddr,
    (namespace, name): (String, String),
    params: Params,
    verb: Verb,
) -> Result<(SubscriptionRef, jiff::Timestamp, usize), Refusal> {
    authorize(history, headers, peer, &namespace, &name, verb).await?;
    let since = match params.since.as_deref() {
        None => jiff::Timestamp::MIN,
        Some(text) => parse_since(text, jiff::Timestamp::now())
            .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("since: {e}")))?,
    };
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!("limit: {limit} is out of range; use 1 to {MAX_LIMIT}"),
        ));
    }
    let Some(uid) = history.directory.uid(&namespace, &name) else {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            format!("no WebhookSubscription {namespace}/{name} is served by this operator"),
        ));
    };
    Ok((SubscriptionRef { namespace, name, uid }, since, limit))
}

fn query(params: Result<Query<Params>, axum::extract::rejection::QueryRejection>) -> Result<Params, Refusal> {
    params.map(|Query(p)| p).map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            format!("{e}; the parameters are since and limit"),
        )
    })
}

/// Runs a store call off the async workers (the store may wait for a commit).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, Refusal> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(err)) => Err(refuse(StatusCode::SERVICE_UNAVAILABLE, err.to_string())),
        Err(err) => Err(refuse(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())),
    }
}

async fn attempts(
    State(history): State<History>,
    Path((namespace, name)): Path<(String, String)>,
    params: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<axum::Json<AttemptList>, Refusal> {
    let (subscription, since, limit) = resolve(
        &history,
        &headers,
        peer.ip(),
        (namespace, name),
        query(params)?,
        Verb::Get,
    )
    .await?;
    let store = history.deliveries.history();
    let uid = subscription.uid.clone();
    let items = blocking(move || store.attempts(&uid, since, limit)).await?;
    Ok(axum::Json(AttemptList { subscription, items }))
}

async fn dead_letters(
    State(history): State<History>,
    Path((namespace, name)): Path<(String, String)>,
    params: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<axum::Json<DeadLetterList>, Refusal> {
    let (subscription, since, limit) = resolve(
        &history,
        &headers,
        peer.ip(),
        (namespace, name),
        query(params)?,
        Verb::Get,
    )
    .await?;
    let store = history.deliveries.history();
    let uid = subscription.uid.clone();
    let items = blocking(move || store.dead_letters(&uid, since, limit)).await?;
    Ok(axum::Json(DeadLetterList { subscription, items }))
}

async fn replay(
    State(history): State<History>,
    Path((namespace, name)): Path<(String, String)>,
    params: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<axum::Json<Replayed>, Refusal> {
    let (subscription, since, _) = resolve(
        &history,
        &headers,
        peer.ip(),
        (namespace, name),
        query(params)?,
        Verb::Patch,
    )
    .await?;
    let deliveries = history.deliveries.clone();
    let uid = subscription.uid.clone();
    let replayed = blocking(move || deliveries.replay(&uid, since)).await?;
    info!(
        namespace = subscription.namespace,
        name = subscription.name,
        replayed,
        "dead-letter replay requested over the admin API"
    );
    Ok(axum::Json(Replayed { subscription, replayed }))
}
