//! HTTP ingest: `POST /v1/events` takes one JSON event (`application/json`) or an NDJSON
//! batch (`application/x-ndjson`). A request is accepted whole or refused whole: every
//! event is checked before any is stored.
//!
//! Every route checks the credentials before reading a byte of the body, then holds a
//! share of the in-flight body budget and one of its credential's request slots while it
//! reads the body within a deadline: an unauthenticated client costs a header, and no
//! producer can take more than its share. The ingest API and the Dovecot routes take
//! tokens of their own files; a token of one is refused by the other.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::json;
use tracing::info;

use super::dovecot::{self, DovecotConfig};
use super::{AcceptError, Pipeline, normalize_address};
use crate::api::{Direction, EventType};
use crate::auth::{Auth, Tokens};
use crate::event::{Attachment, MailboxEvent, Source};
use crate::handles::Readiness;

const MAX_ATTACHMENTS: usize = 1000;
const MAX_RECIPIENTS: usize = 10_000;
const MAX_TEXT: usize = 16 * 1024;

/// Ingest settings from the command line.
#[derive(Clone, Debug)]
pub struct IngestConfig {
    pub token_file: PathBuf,
    pub max_body_bytes: usize,
    pub max_batch_events: usize,
    /// A request's body must arrive within this long of its headers (408 otherwise).
    pub body_timeout: std::time::Duration,
    /// Request bodies being read or processed at once, over every client, in bytes: a
    /// request reserves its Content-Length (the body limit without one); 503 when full.
    pub max_inflight_body_bytes: usize,
    /// Requests of one credential at once; 429 beyond.
    pub max_requests_per_credential: usize,
    /// The Dovecot source's routes (`/v1/sources/dovecot`).
    pub dovecot: DovecotConfig,
    /// The Dovecot routes' own tokens (`--dovecot-token-file`); without them those routes
    /// answer 401 to everyone.
    pub dovecot_tokens: Option<Tokens>,
}

#[derive(Clone)]
struct IngestState {
    pipeline: Arc<Pipeline>,
    tokens: Tokens,
    readiness: Readiness,
    max_batch_events: usize,
    dovecot: Arc<DovecotIntake>,
    limits: Arc<RequestLimits>,
}

/// What bounds the requests of authenticated producers.
struct RequestLimits {
    max_body_bytes: usize,
    body_timeout: std::time::Duration,
    /// Bytes of body in flight, in KiB permits.
    body_budget: Arc<tokio::sync::Semaphore>,
    per_credential: usize,
    budget_kib: usize,
    max_body_kib: usize,
    /// Request slots and body-budget use per credential name.
    credentials: parking_lot::Mutex<std::collections::HashMap<Arc<str>, Arc<CredentialLimits>>>,
}

/// One credential's request slots and the body budget it holds (KiB).
struct CredentialLimits {
    slots: Arc<tokio::sync::Semaphore>,
    held_kib: std::sync::atomic::AtomicUsize,
}

/// A credential's part of the body budget, given back when dropped.
struct Share {
    of: Arc<CredentialLimits>,
    kib: usize,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.of
            .held_kib
            .fetch_sub(self.kib, std::sync::atomic::Ordering::AcqRel);
    }
}

/// What a request holds while it is served: its share of the body budget and its
/// credential's slot.
struct Admitted {
    credential: Arc<str>,
    _slot: tokio::sync::OwnedSemaphorePermit,
    _share: Share,
    _budget: tokio::sync::OwnedSemaphorePermit,
}

/// The Dovecot routes' settings and what they share with the reconciler.
struct DovecotIntake {
    config: DovecotConfig,
    shared: Arc<dovecot::Shared>,
    tokens: Option<Tokens>,
}

pub fn router(config: &IngestConfig, pipeline: Arc<Pipeline>, tokens: Tokens, readiness: Readiness) -> Router {
    router_with(config, pipeline, tokens, readiness, Arc::default())
}

/// As `router`, sharing the Dovecot routes' user locks and first sightings with the
/// Dovecot reconciler.
pub fn router_with(
    config: &IngestConfig,
    pipeline: Arc<Pipeline>,
    tokens: Tokens,
    readiness: Readiness,
    dovecot: Arc<dovecot::Shared>,
) -> Router {
    let shared = dovecot;
    let mut dovecot = config.dovecot.clone();
    // Direction is judged against the pipeline's internal domains, like every source's.
    dovecot.internal_domains.clone_from(&pipeline.internal_domains);
    Router::new()
        .route("/v1/events", post(ingest))
        .route("/v1/sources/dovecot", post(dovecot_batch))
        .route("/v1/sources/dovecot/events", post(dovecot_exported))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(crate::panics::catch_layer(pipeline.metrics.clone(), "ingest"))
        .with_state(IngestState {
            pipeline,
            tokens,
            readiness,
            max_batch_events: config.max_batch_events,
            dovecot: Arc::new(DovecotIntake {
                config: dovecot,
                shared,
                tokens: config.dovecot_tokens.clone(),
            }),
            limits: Arc::new(RequestLimits::new(config)),
        })
}

/// The producer's view of one event.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct IngestEvent {
    #[serde(rename = "type")]
    event_type: EventType,
    /// When it happened at the mail system; defaults to now.
    occurred_at: Option<jiff::Timestamp>,
    /// The producer's unique id for this event; repeats are not delivered again.
    event_id: Option<String>,
    mailbox: String,
    message_id: Option<String>,
    from: Option<String>,
    #[serde(default)]
    to: Vec<String>,
    #[serde(default)]
    cc: Vec<String>,
    #[serde(default)]
    bcc: Vec<String>,
    subject: Option<String>,
    size: Option<u64>,
    #[serde(default)]
    attachments: Vec<IngestAttachment>,
    direction: Option<Direction>,
    folder: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// Who did what in the mailbox store: reads, logins, configuration changes (the shape
    /// the Dovecot source gives them, so receivers see one format).
    activity: Option<IngestActivity>,
}

/// What a producer may say of an activity; mailhook's own marks (`reconciled`,
/// `mailhookSession`) are not taken from producers.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct IngestActivity {
    user: String,
    auth_user: Option<String>,
    service: Option<String>,
    remote_ip: Option<String>,
    session: Option<String>,
    uid: Option<u32>,
    uid_validity: Option<u32>,
    access: Option<crate::event::Access>,
    bulk: Option<crate::event::BulkAccess>,
    login: Option<crate::event::Login>,
    change: Option<crate::event::ConfigChange>,
}

/// Most entries of a list inside an activity (reasons, folders, forwarding targets).
const MAX_ACTIVITY_LIST: usize = 64;

/// An activity as stored, or the refusal naming the field.
fn activity(a: IngestActivity, at: &str) -> Result<crate::event::Activity, Refusal> {
    let bad = |field: &str, problem: &str| {
        Refusal::bad(
            format!("{at}: activity.{field}"),
            format!("{at}: activity.{field}: {problem}"),
        )
    };
    let short = |field: &str, value: &Option<String>, max: usize| match value {
        Some(v) if v.is_empty() || v.len() > max || v.chars().any(char::is_control) => {
            Err(bad(field, &format!("must be 1 to {max} bytes, no control characters")))
        }
        _ => Ok(()),
    };
    short("user", &Some(a.user.clone()), 320)?;
    short("authUser", &a.auth_user, 320)?;
    short("service", &a.service, 64)?;
    short("remoteIp", &a.remote_ip, 64)?;
    short("session", &a.session, 256)?;
    if let Some(access) = &a.access
        && (access.reasons.len() > MAX_ACTIVITY_LIST || access.reasons.iter().any(|r| r.len() > 128))
    {
        return Err(bad(
            "access.reasons",
            &format!("at most {MAX_ACTIVITY_LIST} reasons of 128 bytes"),
        ));
    }
    if let Some(bulk) = &a.bulk
        && (bulk.folders.len() > MAX_ACTIVITY_LIST || bulk.folders.iter().any(|f| f.len() > MAX_TEXT))
    {
        return Err(bad("bulk.folders", &format!("at most {MAX_ACTIVITY_LIST} folders")));
    }
    if let Some(change) = &a.change {
        let forwarding = change.forwarding.as_ref();
        if forwarding.is_some_and(|f| f.targets.len() > MAX_ACTIVITY_LIST * 4 || f.unresolved.len() > MAX_ACTIVITY_LIST)
        {
            return Err(bad("change.forwarding", "too many targets"));
        }
        let texts = [
            change.target.as_deref(),
            change.detail.as_deref(),
            Some(change.command.as_str()),
        ];
        if texts.into_iter().flatten().any(|t| t.len() > MAX_TEXT)
            || change
                .acl
                .as_ref()
                .is_some_and(|g| g.rights.len() > 32 || g.folder.len() > MAX_TEXT)
        {
            return Err(bad(
                "change",
                &format!("a text longer than {MAX_TEXT} bytes, or more than 32 rights"),
            ));
        }
    }
    let auth_user = a.auth_user.filter(|u| !u.eq_ignore_ascii_case(&a.user));
    Ok(crate::event::Activity {
        admin_session: auth_user.is_some(),
        user: a.user,
        auth_user,
        service: a.service,
        remote_ip: a.remote_ip,
        session: a.session,
        uid: a.uid,
        uid_validity: a.uid_validity,
        access: a.access,
        bulk: a.bulk,
        login: a.login,
        change: a.change,
        ..Default::default()
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct IngestAttachment {
    name: Option<String>,
    content_type: Option<String>,
    size: Option<u64>,
    sha256: Option<String>,
}

/// A refusal: status, message, and the field at fault.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
    pub field: Option<String>,
}

/// A 500 for a bug on our side (a caught panic): nothing of the request was accepted.
fn internal_error(detail: String) -> Refusal {
    Refusal {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("{detail}; nothing was accepted"),
        field: None,
    }
}

impl Refusal {
    fn bad(field: impl Into<String>, message: impl Into<String>) -> Refusal {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            field: Some(field.into()),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.message});
        if let Some(f) = self.field {
            body["field"] = json!(f);
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        // A full volume: space comes back when someone grows it or deliveries drain.
        if self.status == StatusCode::INSUFFICIENT_STORAGE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("30"));
        }
        response
    }
}

/// Which tokens a route takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `/v1/events`: the ingest tokens, as bearer tokens.
    Ingest,
    /// The Dovecot routes: the Dovecot tokens, as bearer tokens or HTTP Basic passwords
    /// (Dovecot's event exporter sends nothing else).
    Dovecot,
}

impl Route {
    fn source(self) -> &'static str {
        match self {
            Route::Ingest => "http",
            Route::Dovecot => "dovecot",
        }
    }
}

/// The credential of a request, or the answer refusing it. Nothing of the body is read.
fn credential(
    state: &IngestState,
    headers: &HeaderMap,
    peer: SocketAddr,
    route: Route,
) -> Result<Arc<str>, Box<Response>> {
    let refused = |status, message: &str| {
        Box::new(
            Refusal {
                status,
                message: message.into(),
                field: None,
            }
            .into_response(),
        )
    };
    let auth = match route {
        Route::Ingest => state.tokens.check_request(headers, peer.ip()),
        Route::Dovecot => match &state.dovecot.tokens {
            Some(tokens) => tokens.check_request_or_basic(headers, peer.ip()),
            None => {
                return Err(refused(
                    StatusCode::UNAUTHORIZED,
                    "the Dovecot routes take only the tokens of --dovecot-token-file, which this operator was not given",
                ));
            }
        },
    };
    match auth {
        Auth::Accepted(name) => Ok(name),
        Auth::Refused => Err(refused(
            StatusCode::UNAUTHORIZED,
            match route {
                Route::Ingest => {
                    "missing or unknown bearer token: send Authorization: Bearer <a token of the ingest token file>"
                }
                Route::Dovecot => {
                    "missing or unknown token: send a token of the Dovecot token file as a bearer token or a Basic password"
                }
            },
        )),
        Auth::Locked(left) => {
            let mut response = refused(
                StatusCode::TOO_MANY_REQUESTS,
                "too many unknown tokens from this address; wait before trying again",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, left.as_secs().max(1).into());
            Err(response)
        }
    }
}

impl RequestLimits {
    fn new(config: &IngestConfig) -> RequestLimits {
        // At least one largest body fits, whatever the flags say.
        let budget_kib = config.max_inflight_body_bytes.max(config.max_body_bytes).div_ceil(1024);
        RequestLimits {
            max_body_bytes: config.max_body_bytes,
            body_timeout: config.body_timeout,
            body_budget: Arc::new(tokio::sync::Semaphore::new(budget_kib)),
            per_credential: config.max_requests_per_credential.max(1),
            budget_kib,
            max_body_kib: config.max_body_bytes.div_ceil(1024).max(1),
            credentials: parking_lot::Mutex::default(),
        }
    }

    /// A slot of `credential` and the body budget this request may use, or the refusal
    /// (413 for a body announced over the limit, 429 for a credential at its limit, 503 for
    /// a full budget).
    /// What one credential may hold of the body budget, in KiB, when `names` credentials
    /// are configured: an equal part, at most all of it and at least a quarter — so one
    /// producer sending slowly cannot take it all from three others — and never less than
    /// one largest body.
    fn share_kib(&self, names: usize) -> usize {
        (self.budget_kib / names.clamp(1, 4)).max(self.max_body_kib)
    }

    /// `names`: how many credentials are configured (see `share_kib`).
    fn admit(
        &self,
        credential: Arc<str>,
        headers: &HeaderMap,
        names: usize,
    ) -> Result<Admitted, (Refusal, &'static str)> {
        let announced = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if announced.is_some_and(|n| n > self.max_body_bytes as u64) {
            return Err((too_large(), "body_too_large"));
        }
        let limits = {
            let mut map = self.credentials.lock();
            map.entry(credential.clone())
                .or_insert_with(|| {
                    Arc::new(CredentialLimits {
                        slots: Arc::new(tokio::sync::Semaphore::new(self.per_credential)),
                        held_kib: std::sync::atomic::AtomicUsize::new(0),
                    })
                })
                .clone()
        };
        let slot = limits.slots.clone().try_acquire_owned().map_err(|_| {
            (
                Refusal {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    message: format!(
                        "credential {credential:?} already has {} requests in flight; wait for answers before sending more",
                        self.per_credential
                    ),
                    field: None,
                },
                "token_concurrency",
            )
        })?;
        let bytes = announced.map_or(self.max_body_bytes, |n| usize::try_from(n).unwrap_or(usize::MAX));
        let share_kib = self.share_kib(names);
        let kib = bytes.div_ceil(1024).clamp(1, share_kib);
        let taken = limits.held_kib.fetch_update(
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
            |held| (held + kib <= share_kib).then_some(held + kib),
        );
        if taken.is_err() {
            return Err((
                Refusal {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    message: format!(
                        "credential {credential:?} already has its share of --ingest-max-inflight-bytes ({share_kib} KiB) in request bodies in flight; wait for answers before sending more"
                    ),
                    field: None,
                },
                "token_bytes",
            ));
        }
        let share = Share {
            of: limits.clone(),
            kib,
        };
        let budget = u32::try_from(kib).unwrap_or(u32::MAX);
        let budget = self.body_budget.clone().try_acquire_many_owned(budget).map_err(|_| {
            (
                Refusal {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    message:
                        "too many request bodies in flight; nothing was accepted, retry after the Retry-After delay"
                            .into(),
                    field: None,
                },
                "body_budget",
            )
        })?;
        Ok(Admitted {
            credential,
            _slot: slot,
            _share: share,
            _budget: budget,
        })
    }

    /// The body, read within the deadline and the size limit.
    async fn read(&self, body: Body) -> Result<Bytes, (Refusal, &'static str)> {
        match tokio::time::timeout(self.body_timeout, axum::body::to_bytes(body, self.max_body_bytes)).await {
            Err(_) => Err((
                Refusal {
                    status: StatusCode::REQUEST_TIMEOUT,
                    message: format!(
                        "the request body did not arrive within {} s; nothing was accepted",
                        self.body_timeout.as_secs()
                    ),
                    field: None,
                },
                "body_timeout",
            )),
            Ok(Err(e)) => {
                // `to_bytes` names the limit only in its error's text.
                if crate::error_chain(&e).contains("length limit") {
                    Err((too_large(), "body_too_large"))
                } else {
                    Err((
                        Refusal {
                            status: StatusCode::BAD_REQUEST,
                            message: format!("cannot read the request body: {}", crate::error_chain(&e)),
                            field: None,
                        },
                        "body_unreadable",
                    ))
                }
            }
            Ok(Ok(bytes)) => Ok(bytes),
        }
    }
}

fn too_large() -> Refusal {
    Refusal {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: "request body over the ingest size limit; send smaller batches".into(),
        field: None,
    }
}

/// Authenticates, admits and reads one request: its credential, what it holds while
/// served, and its body; or the answer (counted as `route`'s rejection, and as a listener
/// refusal when a bound refused it).
async fn authenticated_body(
    state: &IngestState,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: Body,
    route: Route,
) -> Result<(Admitted, Bytes), Response> {
    let metrics = &state.pipeline.metrics;
    let source = route.source();
    let name = match credential(state, headers, peer, route) {
        Ok(name) => name,
        Err(response) => {
            metrics.events_ingested.with_label_values(&[source, "rejected"]).inc();
            drain(headers, body).await;
            return Err(*response);
        }
    };
    // Store, caches, the store's size: refused before the body too.
    if let Err(refusal) = admit(state, source) {
        drain(headers, body).await;
        return Err(counted(state, source, refusal));
    }
    let refuse = |(refusal, reason): (Refusal, &'static str)| {
        metrics.refused.with_label_values(&["ingest", reason]).inc();
        counted(state, source, refusal)
    };
    let names = state.tokens.names() + state.dovecot.tokens.as_ref().map_or(0, Tokens::names);
    let admitted = match state.limits.admit(name, headers, names) {
        Ok(admitted) => admitted,
        Err(refused) => {
            drain(headers, body).await;
            return Err(refuse(refused));
        }
    };
    let bytes = state.limits.read(body).await.map_err(refuse)?;
    Ok((admitted, bytes))
}

/// Reads and discards a little of a refused request's body before the answer: a client
/// still sending when the connection closes on unread data gets a reset instead of the
/// answer. Nothing is kept, and the bounds cap what a refused client can cost.
async fn drain(headers: &HeaderMap, body: Body) {
    use futures::StreamExt as _;
    // Reading would invite the body: hyper answers `100 Continue` to a client that waits
    // for it, and a large announced body is not worth reading; the connection is closed.
    let expects = headers.get(header::EXPECT).is_some();
    let large = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 1 << 20);
    if expects || large {
        return;
    }
    const DRAIN_BYTES: usize = 1 << 20;
    const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(1);
    let mut stream = body.into_data_stream();
    let mut read = 0usize;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(chunk)) = stream.next().await {
            read += chunk.len();
            if read >= DRAIN_BYTES {
                break;
            }
        }
    })
    .await;
}

/// Whether new events can be taken now: the store commits, the caches are synced, the
/// store is under `--max-store-bytes` (a subscription's full backlog refuses nothing). `source` labels the metrics.
fn admit(state: &IngestState, source: &str) -> Result<(), Refusal> {
    let metrics = &state.pipeline.metrics;
    if let Some(reason) = state.pipeline.store_down() {
        metrics
            .events_ingested
            .with_label_values(&[source, "unavailable"])
            .inc();
        let status = if Pipeline::out_of_space(&reason) {
            StatusCode::INSUFFICIENT_STORAGE
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return Err(Refusal {
            status,
            message: format!(
                "the store cannot take events right now ({reason}); nothing was accepted, retry after the Retry-After delay"
            ),
            field: None,
        });
    }
    if !state.readiness.is_ready_apart_from(crate::handles::STORE) {
        return Err(Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the operator is starting (caches not yet synced); retry shortly".into(),
            field: None,
        });
    }
    if let Some(reason) = state.pipeline.overloaded() {
        metrics.events_ingested.with_label_values(&[source, "throttled"]).inc();
        return Err(Refusal {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!("{reason}; nothing was accepted, retry after the Retry-After delay"),
            field: None,
        });
    }
    Ok(())
}

/// The media type of a request, lower-cased, without parameters.
fn media_type(headers: &HeaderMap) -> (String, String) {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let media = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    (content_type, media)
}

/// Runs `work` (store commits) off the async workers; a panic in it is a 500 for this
/// request only. The work holds the request's admission (`held`) until it ends: a client
/// that hangs up does not give back its slot and budget while its events are still being
/// stored.
async fn blocking<T: Send + 'static>(
    state: &IngestState,
    held: Arc<Admitted>,
    work: impl FnOnce() -> Result<T, Refusal> + Send + 'static,
) -> Result<T, Refusal> {
    let metrics = state.pipeline.metrics.clone();
    let work = move || {
        let _held = held;
        work()
    };
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        if e.is_panic() {
            crate::panics::record(&metrics, "ingest");
            return internal_error(crate::panics::ANSWER.into());
        }
        Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("the store did not answer ({e}); nothing was accepted, retry"),
            field: None,
        }
    })?
}

fn stored_refusal(e: AcceptError, field: impl FnOnce(usize) -> String) -> Refusal {
    match e {
        AcceptError::Store(e) => Refusal {
            status: if Pipeline::out_of_space(&e.to_string()) {
                StatusCode::INSUFFICIENT_STORAGE
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            message: format!("cannot store the events ({e}); nothing was accepted, retry"),
            field: None,
        },
        AcceptError::RoutingPanicked { index, .. } => Refusal {
            field: Some(field(index)),
            ..internal_error(e.to_string())
        },
    }
}

fn accepted(outcomes: &[crate::store::Appended]) -> Response {
    let duplicates = outcomes.iter().filter(|o| o.duplicate).count();
    let body = json!({
        "accepted": outcomes.len() - duplicates,
        "duplicates": duplicates,
        "events": outcomes.iter().map(|o| json!({"id": o.id, "duplicate": o.duplicate})).collect::<Vec<_>>(),
    });
    (StatusCode::ACCEPTED, axum::Json(body)).into_response()
}

/// Counts a refusal other than throttling as a rejected request of `source` (an
/// unavailable store counts as both).
fn counted(state: &IngestState, source: &str, refusal: Refusal) -> Response {
    tracing::debug!(source, status = %refusal.status, message = %refusal.message, "request refused");
    if refusal.status != StatusCode::TOO_MANY_REQUESTS {
        state
            .pipeline
            .metrics
            .events_ingested
            .with_label_values(&[source, "rejected"])
            .inc();
    }
    refusal.into_response()
}

async fn ingest(
    State(state): State<IngestState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (admitted, body) = match authenticated_body(&state, peer, &headers, body, Route::Ingest).await {
        Ok(read) => read,
        Err(response) => return response,
    };
    match accept(&state, &headers, Arc::new(admitted), body).await {
        Ok(response) => response,
        Err(refusal) => counted(&state, "http", refusal),
    }
}

async fn accept(
    state: &IngestState,
    headers: &HeaderMap,
    admitted: Arc<Admitted>,
    body: Bytes,
) -> Result<Response, Refusal> {
    let (content_type, media) = media_type(headers);
    let ndjson = match media.as_str() {
        "application/json" => false,
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => true,
        _ => {
            return Err(Refusal {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                message: format!(
                    "content type {content_type:?} is not accepted: send application/json (one event) or application/x-ndjson (one event per line)"
                ),
                field: None,
            });
        }
    };
    let mut events = read_events(
        &body,
        ndjson,
        state.max_batch_events,
        &state.pipeline.internal_domains,
        jiff::Timestamp::now(),
    )?;
    drop(body);
    // A producer's ids de-duplicate among its own events only: no other producer, source
    // or sender can pre-empt them.
    for e in &mut events {
        e.producer_scope = Some(admitted.credential.to_string());
    }
    let pipeline = state.pipeline.clone();
    let outcomes = blocking(state, admitted.clone(), move || {
        pipeline.accept(events).map_err(|e| {
            stored_refusal(e, |index| {
                if ndjson {
                    format!("event {} of the batch", index + 1)
                } else {
                    "body".into()
                }
            })
        })
    })
    .await?;
    info!(
        events = outcomes.len(),
        duplicates = outcomes.iter().filter(|o| o.duplicate).count(),
        credential = %admitted.credential,
        "ingested"
    );
    Ok(accepted(&outcomes))
}

/// A Dovecot route's request: credentials (bearer or Basic) before the body, admission,
/// one JSON body read into `T`; `handle` stores what it says. The answer: 202 with the
/// outcomes, or the refusal (counted as the dovecot source's).
async fn dovecot_request<T, F, Fut>(
    state: IngestState,
    peer: SocketAddr,
    headers: HeaderMap,
    body: Body,
    handle: F,
) -> Response
where
    T: serde::de::DeserializeOwned,
    F: FnOnce(IngestState, T, Arc<Admitted>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<crate::store::Appended>, Refusal>>,
{
    let (admitted, body) = match authenticated_body(&state, peer, &headers, body, Route::Dovecot).await {
        Ok(read) => read,
        Err(response) => return response,
    };
    let credential = admitted.credential.clone();
    let work = async {
        json_only(&headers)?;
        let request: T = parse(&body, "body")?;
        drop(body);
        handle(state.clone(), request, Arc::new(admitted)).await
    };
    match work.await {
        Ok(outcomes) => {
            state.pipeline.heard_from(crate::event::Source::Dovecot, &credential);
            accepted(&outcomes)
        }
        Err(refusal) => counted(&state, "dovecot", refusal),
    }
}

/// `POST /v1/sources/dovecot`: one push-notification batch of the Lua script.
async fn dovecot_batch(
    State(state): State<IngestState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    dovecot_request(
        state,
        peer,
        headers,
        body,
        |state, batch: dovecot::Batch, held| async move {
            let intake = state.dovecot.clone();
            let pipeline = state.pipeline.clone();
            let user = batch.user.trim().to_string();
            // Taken here, not on the blocking thread: the reconciler holds this lock while
            // it waits for a blocking thread, so blocking threads parked on it could take
            // the whole (bounded) pool and never be freed.
            let user_lock = intake.shared.locks.lock(&user).await;
            blocking(&state, held, move || {
                let _user = user_lock;
                let rows = pipeline.deliveries.rows();
                let mut failed = None;
                let mut lookup = |key: &dovecot::index::MessageKey| match dovecot::index::message(rows.as_ref(), key) {
                    Ok(found) => found,
                    Err(e) => {
                        failed = Some(e);
                        None
                    }
                };
                let mapped = dovecot::map_batch(batch, &mut lookup, &intake.config, jiff::Timestamp::now())
                    .map_err(|e| Refusal::bad(e.field.clone(), e.to_string()))?;
                if let Some(e) = failed {
                    return Err(stored_refusal(AcceptError::Store(e), |_| String::new()));
                }
                // Nothing to store (noise): no commit to wait for.
                if mapped.events.is_empty() && mapped.index.is_empty() {
                    intake.shared.seen(&user);
                    return Ok(Vec::new());
                }
                let outcomes = dovecot::index::accept(&pipeline, mapped.events, mapped.index)
                    .map_err(|e| stored_refusal(e, |index| format!("event {} of the batch", index + 1)))?;
                intake.shared.seen(&user);
                Ok(outcomes)
            })
            .await
        },
    )
    .await
}

/// `POST /v1/sources/dovecot/events`: one event of Dovecot's event exporter. A
/// configuration change or a login is stored; a read or a failed login is held (see
/// `dovecot::held`); anything else is acknowledged and dropped.
async fn dovecot_exported(
    State(state): State<IngestState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    dovecot_request(
        state,
        peer,
        headers,
        body,
        |state, exported: dovecot::Exported, held| async move {
            let now = jiff::Timestamp::now();
            let config = &state.dovecot.config;
            let Some(reported) = dovecot::exported::read(&exported, config, now) else {
                return Ok(Vec::new());
            };
            let (event, rows) = match reported {
                dovecot::exported::Reported::Event { event, session } => {
                    let rows = match session {
                        Some((id, info)) => vec![
                            dovecot::held::remember(&id, &info, now)
                                .map_err(|e| stored_refusal(AcceptError::Store(e), |_| "body".into()))?,
                        ],
                        None => vec![],
                    };
                    (Some(*event), rows)
                }
                dovecot::exported::Reported::Sieve {
                    mut event,
                    user,
                    script,
                } => {
                    let forwarding = sieve_forwarding(config, &user, script.as_deref()).await;
                    if let Some(change) = event.activity.as_mut().and_then(|a| a.change.as_mut()) {
                        change.forwarding = Some(forwarding);
                    }
                    (Some(*event), vec![])
                }
                dovecot::exported::Reported::Held(item) => {
                    let row = dovecot::held::hold(&item)
                        .map_err(|e| stored_refusal(AcceptError::Store(e), |_| "body".into()))?;
                    // Answered once buffered (see `held::Buffer`); written here only when
                    // the buffer is full.
                    if state.dovecot.shared.held.push(row.clone()) {
                        return Ok(Vec::new());
                    }
                    (None, vec![row])
                }
            };
            let pipeline = state.pipeline.clone();
            blocking(&state, held, move || match event {
                Some(event) => pipeline
                    .accept_with_rows(vec![event], rows)
                    .map_err(|e| stored_refusal(e, |_| "body".into())),
                None => pipeline
                    .deliveries
                    .rows()
                    .write_rows(rows)
                    .map(|()| Vec::new())
                    .map_err(|e| stored_refusal(AcceptError::Store(e), |_| "body".into())),
            })
            .await
        },
    )
    .await
}

/// Where the script a Sieve change names sends mail: read over ManageSieve when
/// `--dovecot-managesieve-addr` is set; otherwise, or when it cannot be read, unknown,
/// which counts as external (a compliance filter must not miss a forward it could not
/// read). The read runs on a task of its own, so an exporter that stops waiting does not
/// cut it short.
async fn sieve_forwarding(config: &DovecotConfig, user: &str, script: Option<&str>) -> crate::event::Forwarding {
    let summary = match (&config.sieve, script) {
        (None, _) => Err(
            "the script was not read: set --dovecot-managesieve-addr so mailhook can read Sieve scripts".to_string(),
        ),
        // SETACTIVE "": every script deactivated, nothing is sent anywhere.
        (Some(_), Some("")) => Ok((dovecot::sieve::Summary::default(), Some(false))),
        (Some(server), name) => {
            let (server, user, name) = (server.clone(), user.to_string(), name.map(String::from));
            let read = tokio::spawn(async move { server.script(&user, name.as_deref()).await });
            match read.await {
                Ok(Ok(Some(found))) => dovecot::sieve::summarize(&found.text)
                    .map(|summary| (summary, Some(found.active)))
                    .map_err(|e| format!("the script is not readable Sieve: {e}")),
                Ok(Ok(None)) => Err("the script is gone (changed again before mailhook read it)".to_string()),
                Ok(Err(e)) => {
                    tracing::warn!(error = %crate::error_chain(&e), "cannot read a Sieve script over ManageSieve");
                    Err(format!("the script could not be read: {e}"))
                }
                Err(e) => Err(format!("reading the script stopped: {e}")),
            }
        }
    };
    dovecot::exported::forwarding(summary, &config.internal_domains)
}

fn json_only(headers: &HeaderMap) -> Result<(), Refusal> {
    let (content_type, media) = media_type(headers);
    if media == "application/json" {
        return Ok(());
    }
    Err(Refusal {
        status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
        message: format!("content type {content_type:?} is not accepted: send application/json"),
        field: None,
    })
}

/// Reads a request body into events: one JSON event, or NDJSON with at most `max_batch`;
/// the whole body is refused at the first bad event, naming where. Pure.
pub fn read_events(
    body: &[u8],
    ndjson: bool,
    max_batch: usize,
    internal_domains: &[String],
    now: jiff::Timestamp,
) -> Result<Vec<MailboxEvent>, Refusal> {
    if !ndjson {
        return Ok(vec![
            parse(body, "body").and_then(|e| normalize(e, now, internal_domains, "body"))?,
        ]);
    }
    let mut events = Vec::new();
    for (i, line) in body.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if events.len() == max_batch {
            return Err(Refusal {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                message: format!("more than {max_batch} events in one batch; split it"),
                field: None,
            });
        }
        let at = format!("line {}", i + 1);
        events.push(parse(line, &at).and_then(|e| normalize(e, now, internal_domains, &at))?);
    }
    if events.is_empty() {
        return Err(Refusal::bad("body", "the batch holds no event"));
    }
    Ok(events)
}

/// JSON into `T`, refused with the path of the first bad field (`at`: where the JSON was).
fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], at: &str) -> Result<T, Refusal> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            at.to_string()
        } else {
            format!("{at}: {path}")
        };
        Refusal::bad(field.clone(), format!("{field}: {}", e.inner()))
    })
}

fn normalize(
    e: IngestEvent,
    now: jiff::Timestamp,
    internal_domains: &[String],
    at: &str,
) -> Result<MailboxEvent, Refusal> {
    let address = |field: &str, value: &str| {
        normalize_address(value).ok_or_else(|| {
            Refusal::bad(
                format!("{at}: {field}"),
                format!("{at}: {field}: {value:?} is not an email address (local@domain)"),
            )
        })
    };
    let addresses = |field: &str, list: &[String]| -> Result<Vec<String>, Refusal> {
        if list.len() > MAX_RECIPIENTS {
            return Err(Refusal::bad(
                format!("{at}: {field}"),
                format!("{at}: {field}: more than {MAX_RECIPIENTS} addresses"),
            ));
        }
        list.iter()
            .enumerate()
            .map(|(i, a)| address(&format!("{field}[{i}]"), a))
            .collect()
    };
    let text = |field: &str, value: Option<String>| -> Result<Option<String>, Refusal> {
        match value {
            Some(v) if v.len() > MAX_TEXT => Err(Refusal::bad(
                format!("{at}: {field}"),
                format!("{at}: {field}: longer than {MAX_TEXT} bytes"),
            )),
            other => Ok(other),
        }
    };
    if let Some(id) = &e.event_id
        && (id.is_empty() || id.len() > 256 || id.chars().any(char::is_control))
    {
        return Err(Refusal::bad(
            format!("{at}: eventId"),
            format!("{at}: eventId: must be 1 to 256 characters, none of them control characters"),
        ));
    }
    if e.event_type == EventType::ComplianceFlagged {
        return Err(Refusal::bad(
            format!("{at}: type"),
            format!("{at}: type: compliance.flagged is produced by MailboxFilters, not ingested"),
        ));
    }
    if e.attachments.len() > MAX_ATTACHMENTS {
        return Err(Refusal::bad(
            format!("{at}: attachments"),
            format!("{at}: attachments: more than {MAX_ATTACHMENTS}"),
        ));
    }
    let mailbox = address("mailbox", &e.mailbox)?;
    let from = e.from.as_deref().map(|f| address("from", f)).transpose()?;
    let to = addresses("to", &e.to)?;
    let cc = addresses("cc", &e.cc)?;
    let bcc = addresses("bcc", &e.bcc)?;
    let direction = e.direction.or(match e.event_type {
        EventType::MessageReceived => Some(Direction::Inbound),
        EventType::MessageSent => Some(Direction::Outbound),
        EventType::MessageInternal => Some(Direction::Internal),
        _ => super::direction(
            from.as_deref(),
            to.iter().chain(&cc).chain(&bcc).map(String::as_str),
            internal_domains,
        ),
    });
    Ok(MailboxEvent {
        id: MailboxEvent::new_id(),
        event_type: e.event_type,
        occurred_at: e.occurred_at.unwrap_or(now),
        received_at: now,
        source: Source::Http,
        producer_event_id: e.event_id,
        mailbox,
        message_id: text("messageId", e.message_id)?,
        from,
        to,
        cc,
        bcc,
        subject: text("subject", e.subject)?,
        size: e.size,
        attachments: e
            .attachments
            .into_iter()
            .map(|a| Attachment {
                name: a.name,
                content_type: a.content_type.map(|t| t.to_ascii_lowercase()),
                size: a.size,
                sha256: a.sha256,
            })
            .collect(),
        direction,
        folder: text("folder", e.folder)?,
        headers: e
            .headers
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect(),
        flags: vec![],
        flagged_event_id: None,
        flag_namespace: None,
        raw_message: None,
        activity: e.activity.map(|a| activity(a, at)).transpose()?.map(Box::new),
        dead_letter: None,
        producer_scope: None,
        log_index: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(budget_mib: usize, body_mib: usize, per_credential: usize) -> RequestLimits {
        RequestLimits::new(&IngestConfig {
            token_file: PathBuf::from("/nonexistent"),
            max_body_bytes: body_mib << 20,
            max_batch_events: 10,
            body_timeout: std::time::Duration::from_secs(1),
            max_inflight_body_bytes: budget_mib << 20,
            max_requests_per_credential: per_credential,
            dovecot: DovecotConfig::default(),
            dovecot_tokens: None,
        })
    }

    fn announcing(bytes: usize) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, bytes.into());
        h
    }

    fn reason<T>(r: Result<T, (Refusal, &'static str)>) -> Option<(u16, &'static str)> {
        r.err().map(|(refusal, reason)| (refusal.status.as_u16(), reason))
    }

    #[test]
    fn producers_post_reads_logins_and_changes_with_their_activity() {
        let now = jiff::Timestamp::now();
        let body = br#"{"type": "message.accessed", "mailbox": "alice@example.com", "messageId": "<m@x>",
            "activity": {"user": "alice@example.com", "authUser": "helpdesk", "service": "owa",
                         "remoteIp": "192.0.2.9", "access": {"command": "GetItem", "reasons": ["owa:read"]}}}"#;
        let e = read_events(body, false, 10, &[], now).expect("accepted");
        let a = e[0].activity.as_deref().expect("activity");
        assert!(a.admin_session && !a.mailhook_session && !a.reconciled);
        assert_eq!(a.access.as_ref().and_then(|x| x.command.as_deref()), Some("GetItem"));
        let login = br#"{"type": "mailbox.login", "mailbox": "bob@example.com", "activity": {"user": "bob@example.com",
            "login": {"outcome": "failed", "reason": "bad password", "attempts": 12,
                      "firstAt": "2026-12-07T10:00:00Z", "lastAt": "2026-12-07T10:05:00Z"}}}"#;
        assert!(read_events(login, false, 10, &[], now).is_ok());
        for (body, field) in [
            (
                r#"{"type": "mailbox.login", "mailbox": "b@example.com", "activity": {"user": "b@example.com", "mailhookSession": true}}"#
                    .to_string(),
                "body",
            ),
            (
                format!(
                    r#"{{"type": "message.accessed", "mailbox": "b@example.com", "activity": {{"user": "{}"}}}}"#,
                    "u".repeat(321)
                ),
                "body: activity.user",
            ),
            (
                r#"{"type": "message.accessed", "mailbox": "b@example.com", "activity": {"user": "b", "remoteIp": "a"}}"#
                    .to_string(),
                "body: activity.remoteIp",
            ),
        ] {
            let refused = read_events(body.as_bytes(), false, 10, &[], now).expect_err("refused");
            assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{body}");
            assert!(refused.field.as_deref().is_some_and(|f| f.starts_with(field)), "{body}: {:?}", refused.field);
        }
    }

    #[test]
    fn a_body_announced_over_the_limit_is_refused_before_anything_is_held() {
        let l = limits(64, 8, 4);
        assert_eq!(
            reason(l.admit("a".into(), &announcing(9 << 20), 1)),
            Some((413, "body_too_large"))
        );
        let held: Vec<_> = (0..4)
            .map(|_| l.admit("a".into(), &announcing(1024), 1).expect("admitted"))
            .collect();
        assert_eq!(held.len(), 4, "nothing was held by the refused request");
    }

    #[test]
    fn one_credential_has_its_slots_and_its_share_of_the_budget() {
        let l = limits(64, 8, 3);
        // Four credentials configured: each may hold a quarter (16 MiB) of the budget.
        let a: Vec<_> = (0..2)
            .map(|_| l.admit("a".into(), &announcing(8 << 20), 4).expect("within a's share"))
            .collect();
        assert_eq!(
            reason(l.admit("a".into(), &announcing(1024), 4)),
            Some((429, "token_bytes"))
        );
        // The others still have room.
        let b = l.admit("b".into(), &announcing(8 << 20), 4).expect("b");
        drop(a);
        let small: Vec<_> = (0..3)
            .map(|_| l.admit("a".into(), &announcing(1024), 4).expect("a's slots"))
            .collect();
        assert_eq!(
            reason(l.admit("a".into(), &announcing(1024), 4)),
            Some((429, "token_concurrency"))
        );
        drop((b, small));
    }

    #[test]
    fn with_one_credential_configured_it_may_use_the_whole_budget_and_then_everyone_waits() {
        let l = limits(16, 4, 100);
        // Without Content-Length a request reserves the body limit.
        let held: Vec<_> = (0..4)
            .map(|_| {
                l.admit("ingest".into(), &HeaderMap::new(), 1)
                    .expect("within the budget")
            })
            .collect();
        assert_eq!(
            reason(l.admit("ingest".into(), &HeaderMap::new(), 1)),
            Some((429, "token_bytes"))
        );
        assert_eq!(
            reason(l.admit("other".into(), &announcing(1024), 1)),
            Some((503, "body_budget")),
            "the budget over every credential is full"
        );
        drop(held);
        assert!(
            l.admit("other".into(), &announcing(1024), 1).is_ok(),
            "given back when dropped"
        );
    }
}
