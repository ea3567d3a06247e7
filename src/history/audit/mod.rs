//! The audit API on the admin port, and the checkpoints it serves (`crate::audit` says
//! what the log is; `client` is `mailhook audit`).
//!
//! - `GET /v1/audit/key`: the checkpoint verifier key (public, no token).
//! - `GET /v1/audit/checkpoint[?size=N]`: the newest signed checkpoint, or the one of size N.
//! - `GET /v1/audit/prove?event=ID | index=N | from=SIZE`: evidence (`audit::proof`)
//!   against the newest checkpoint: the leaves about an event (its acceptance, then its
//!   delivery attempts), one leaf, or the consistency of an older checkpoint with it;
//!   `events=ID,ID,…[&from=SIZE]`: the evidence of an investigation bundle, all against
//!   one checkpoint (`mailhook audit export`).
//! - `POST /v1/audit/custody` `{action, subject, detail}`: appends an act of custody (a
//!   restore, say), by the admin token's name.
//!
//! Everything but the key takes only a token from `--admin-token-file`: the log spans every
//! namespace, and its size is the organisation's mail volume.
//!
//! Checkpoints are kept in the store, one per signed size (the newest is the largest),
//! shared by every replica. The leader signs one every `--audit-checkpoint-interval` when
//! the log grew; a proof asked for a leaf no checkpoint covers yet signs one at once, on
//! whichever replica is asked. Signatures are deterministic: two replicas signing one size
//! sign the same note.

pub mod client;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::audit::key::{Checkpoint, CheckpointError, Key, KeyError};
use crate::audit::proof::{Consistency, Evidence, Inclusion, encode};
use crate::audit::{TreeError, prove_consistency, prove_leaf, root};
use crate::store::audit::Hashes;
use crate::store::{AuditTrail, StoreError};

/// Why the log cannot be signed, read or proven; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("the store")]
    Store(#[from] StoreError),
    #[error("the audit log's tree")]
    Tree(#[from] TreeError),
    #[error("the checkpoint key")]
    Key(#[from] KeyError),
    #[error("a stored checkpoint does not open with this operator's key (was the key changed?)")]
    Stored(#[source] CheckpointError),
    #[error(
        "the audit log no longer extends its checkpoint of size {old}: its history was rewritten, or the store was restored from a backup. No checkpoint is signed until this is looked into (docs/audit.md: recording a restore)"
    )]
    Rewritten { old: u64 },
    #[error("the audit log has {size} leaves; there is no leaf {index}")]
    NoLeaf { index: u64, size: u64 },
    #[error("no checkpoint of size {0} was signed")]
    NoCheckpoint(u64),
    #[error("event {0} is not in the audit log")]
    NoEvent(String),
}

/// The audit log of a store, with the key that signs its checkpoints.
#[derive(Clone)]
pub struct Audit {
    trail: Arc<dyn AuditTrail>,
    key: Key,
    /// One signer at a time in this process.
    signing: Arc<parking_lot::Mutex<()>>,
}

/// A signed checkpoint: its size and its note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub size: u64,
    pub note: String,
}

impl Audit {
    pub fn new(trail: Arc<dyn AuditTrail>, key: Key) -> Audit {
        Audit {
            trail,
            key,
            signing: Arc::default(),
        }
    }

    pub fn key(&self) -> &Key {
        &self.key
    }

    fn note(&self, size: Option<u64>) -> Result<Option<String>, AuditError> {
        Ok(self
            .trail
            .audit_checkpoint(size)?
            .map(|(_, note)| String::from_utf8_lossy(&note).into_owned()))
    }

    fn open(&self, note: &str) -> Result<Checkpoint, AuditError> {
        crate::audit::key::open(note, self.key.vkey()).map_err(AuditError::Stored)
    }

    /// The newest signed checkpoint.
    pub fn latest(&self) -> Result<Option<(Checkpoint, String)>, AuditError> {
        match self.note(None)? {
            Some(note) => Ok(Some((self.open(&note)?, note))),
            None => Ok(None),
        }
    }

    /// The checkpoint signed at `size`.
    pub fn checkpoint(&self, size: u64) -> Result<Option<String>, AuditError> {
        self.note(Some(size))
    }

    /// Signs a checkpoint of the log as it is now, when it grew since the newest one and
    /// still extends it. Blocks on the store.
    pub fn sign(&self) -> Result<Option<Signed>, AuditError> {
        let _one = self.signing.lock();
        // The newest checkpoint first: another replica may sign a larger one meanwhile,
        // and the log only grows, so the size read after it is at least as large.
        let latest = self.latest()?;
        let size = self.trail.audit_size()?;
        if let Some((old, _)) = &latest
            && old.size > size
        {
            // Leaves signed for are gone: truncated, or restored from an older backup.
            return Err(AuditError::Rewritten { old: old.size });
        }
        if latest.as_ref().is_some_and(|(c, _)| c.size == size) || size == 0 {
            return Ok(None);
        }
        let hashes = Hashes(self.trail.as_ref());
        let top = root(size, &hashes)?;
        if let Some((old, _)) = &latest {
            // The log only grows: a tree that does not extend what was signed is refused
            // here, before a witness would have to find out. (A store that cannot be read
            // is an error of its own, not a rewrite.)
            let proof = prove_consistency(size, old.size, &hashes)?;
            if tlog_tiles::check_tree(&proof, size, top, old.size, old.root).is_err() {
                return Err(AuditError::Rewritten { old: old.size });
            }
        }
        let note = self.key.sign(size, top)?;
        self.trail.audit_keep_checkpoint(size, note.clone().into_bytes())?;
        Ok(Some(Signed { size, note }))
    }

    /// The newest checkpoint covering leaf `index` (signed now if none does yet).
    fn covering(&self, index: u64) -> Result<(Checkpoint, String), AuditError> {
        if let Some((c, note)) = self.latest()?
            && c.size > index
        {
            return Ok((c, note));
        }
        self.sign()?;
        match self.latest()? {
            Some((c, note)) if c.size > index => Ok((c, note)),
            _ => Err(AuditError::NoLeaf {
                index,
                size: self.trail.audit_size()?,
            }),
        }
    }

    /// Evidence that the leaves `indexes` are in the log.
    pub fn prove_leaves(&self, indexes: &[u64]) -> Result<Evidence, AuditError> {
        let highest = indexes.iter().copied().max().unwrap_or(0);
        let (head, note) = self.covering(highest)?;
        let hashes = Hashes(self.trail.as_ref());
        let mut inclusion = Vec::with_capacity(indexes.len());
        for &index in indexes {
            let record = self
                .trail
                .audit_records(index, index + 1)?
                .into_iter()
                .next()
                .ok_or(AuditError::NoLeaf { index, size: head.size })?
                .1;
            use base64::Engine as _;
            inclusion.push(Inclusion {
                index,
                record: base64::engine::general_purpose::STANDARD.encode(record),
                proof: encode(&prove_leaf(head.size, index, &hashes)?),
            });
        }
        Ok(Evidence {
            checkpoint: note,
            inclusion,
            consistency: vec![],
        })
    }

    /// Evidence of an event: its acceptance and every delivery attempt logged for it.
    pub fn prove_event(&self, event_id: &str) -> Result<Evidence, AuditError> {
        let leaves = self.trail.audit_leaves_of(event_id)?;
        if leaves.is_empty() {
            return Err(AuditError::NoEvent(event_id.into()));
        }
        self.prove_leaves(&leaves)
    }

    /// Evidence for an investigation bundle: the leaves of every event in `ids` against
    /// one checkpoint, and, given `from`, that checkpoint's consistency with the older one
    /// of `from` leaves (a witness's or the auditor's last).
    pub fn prove_events(&self, ids: &[String], from: Option<u64>) -> Result<Evidence, AuditError> {
        let mut leaves = Vec::new();
        for id in ids {
            let of = self.trail.audit_leaves_of(id)?;
            if of.is_empty() {
                return Err(AuditError::NoEvent(id.clone()));
            }
            leaves.extend(of);
        }
        leaves.sort_unstable();
        leaves.dedup();
        let mut evidence = self.prove_leaves(&leaves)?;
        if let Some(old) = from {
            let head = self.open(&evidence.checkpoint)?;
            if old > head.size {
                return Err(AuditError::NoLeaf {
                    index: old.saturating_sub(1),
                    size: head.size,
                });
            }
            let proof = prove_consistency(head.size, old, &Hashes(self.trail.as_ref()))?;
            evidence.consistency.push(Consistency {
                old: self.checkpoint(old)?.unwrap_or_default(),
                proof: encode(&proof),
            });
        }
        Ok(evidence)
    }

    /// Evidence that the newest checkpoint extends the tree of `old` leaves: with the
    /// checkpoint this log signed at that size, when it has one (a witness checks against
    /// its own copy instead: `mailhook audit verify --witness`).
    pub fn prove_from(&self, old: u64) -> Result<Evidence, AuditError> {
        let old_note = self.checkpoint(old)?.unwrap_or_default();
        let (head, note) = match self.latest()? {
            Some((head, note)) if head.size >= old => (head, note),
            _ => {
                self.sign()?;
                self.latest()?.ok_or(AuditError::NoCheckpoint(old))?
            }
        };
        if head.size < old {
            return Err(AuditError::NoLeaf {
                index: old.saturating_sub(1),
                size: head.size,
            });
        }
        let proof = prove_consistency(head.size, old, &Hashes(self.trail.as_ref()))?;
        Ok(Evidence {
            checkpoint: note,
            inclusion: vec![],
            consistency: vec![Consistency {
                old: old_note,
                proof: encode(&proof),
            }],
        })
    }
}

/// Signs a checkpoint every `interval` while this replica leads, until `stop`.
pub async fn keep_signing(
    audit: Audit,
    interval: std::time::Duration,
    leadership: crate::handles::Leadership,
    metrics: crate::metrics::Metrics,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !leadership.is_leader() {
            continue;
        }
        let (a, m) = (audit.clone(), metrics.clone());
        let pass = tokio::task::spawn_blocking(move || {
            let signed = a.sign();
            if let Ok(size) = a.trail.audit_size() {
                m.audit_log_size.set(i64::try_from(size).unwrap_or(i64::MAX));
            }
            signed
        });
        // A store that hangs must not hold the shutdown up: the pass is left to end alone.
        let pass = tokio::select! {
            _ = stop.cancelled() => return,
            pass = pass => pass,
        };
        match pass {
            Ok(Ok(Some(signed))) => {
                metrics
                    .audit_checkpoint_size
                    .set(i64::try_from(signed.size).unwrap_or(i64::MAX));
                tracing::debug!(size = signed.size, "audit log checkpoint signed");
            }
            Ok(Ok(None)) => {}
            Ok(Err(err)) => {
                metrics.audit_checkpoint_failures.inc();
                tracing::error!(err = %crate::error_chain(&err), "cannot sign an audit log checkpoint");
            }
            Err(err) => {
                metrics.audit_checkpoint_failures.inc();
                tracing::error!(%err, "the audit checkpoint pass stopped unexpectedly");
            }
        }
    }
}

/// What the audit API reads, and who may ask.
#[derive(Clone)]
pub struct AuditApi {
    pub audit: Audit,
    pub history: super::History,
}

pub fn router(api: AuditApi) -> Router {
    Router::new()
        .route("/v1/audit/key", get(key))
        .route("/v1/audit/checkpoint", get(checkpoint))
        .route("/v1/audit/prove", get(prove))
        .route("/v1/audit/custody", axum::routing::post(custody))
        .route("/v1/audit/raw-messages/{sha256}", get(raw_message))
        .with_state(api)
}

async fn key(State(api): State<AuditApi>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{}\n", api.audit.key().vkey()),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointParams {
    size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProveParams {
    event: Option<String>,
    /// Event ids, comma-separated: an investigation bundle's evidence (with `from`, if given).
    events: Option<String>,
    index: Option<u64>,
    from: Option<u64>,
}

/// Most events one bundle's evidence is asked for.
const MAX_BUNDLE_EVENTS: usize = 1000;

fn answer(err: AuditError) -> Response {
    let status = match &err {
        AuditError::NoLeaf { .. } | AuditError::NoCheckpoint(_) | AuditError::NoEvent(_) => StatusCode::NOT_FOUND,
        AuditError::Rewritten { .. } | AuditError::Stored(_) => StatusCode::CONFLICT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (
        status,
        axum::Json(serde_json::json!({ "error": crate::error_chain(&err) })),
    )
        .into_response()
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, AuditError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(err)) => Err(answer(err)),
        Err(_) => Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            "the audit request stopped unexpectedly",
        )
            .into_response()),
    }
}

async fn checkpoint(
    State(api): State<AuditApi>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: Result<Query<CheckpointParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(refused) = super::admin_only(&api.history, &headers, peer.ip(), "the audit API") {
        return refused.into_response();
    }
    let Ok(Query(params)) = params else {
        return (StatusCode::BAD_REQUEST, "the only parameter is size=<tree size>").into_response();
    };
    let audit = api.audit.clone();
    let note = blocking(move || match params.size {
        Some(size) => audit.checkpoint(size)?.ok_or(AuditError::NoCheckpoint(size)),
        None => {
            if audit.latest()?.is_none() {
                audit.sign()?;
            }
            Ok(audit.latest()?.ok_or(AuditError::NoCheckpoint(0))?.1)
        }
    })
    .await;
    match note {
        Ok(note) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], note).into_response(),
        Err(response) => response,
    }
}

async fn prove(
    State(api): State<AuditApi>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: Result<Query<ProveParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let by = match super::admin_only(&api.history, &headers, peer.ip(), "the audit API") {
        Ok(name) => name,
        Err(refused) => return refused.into_response(),
    };
    let usage = "ask for one of event=<event id>, index=<leaf index>, from=<size of an older checkpoint>, \
                 or events=<id>,<id>,… (with from= if wanted)";
    let Ok(Query(params)) = params else {
        return (StatusCode::BAD_REQUEST, usage).into_response();
    };
    if params.from == Some(0) {
        return (
            StatusCode::BAD_REQUEST,
            "from=0: an empty tree needs no proof; give the size of an older checkpoint",
        )
            .into_response();
    }
    let audit = api.audit.clone();
    let evidence = match (params.event, params.events, params.index, params.from) {
        (Some(event), None, None, None) => blocking(move || audit.prove_event(&event)).await,
        (None, Some(events), None, from) => {
            let ids: Vec<String> = events
                .split(',')
                .map(str::trim)
                .filter(|id| !id.is_empty())
                .map(String::from)
                .collect();
            if ids.is_empty() || ids.len() > MAX_BUNDLE_EVENTS {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("events=: 1 to {MAX_BUNDLE_EVENTS} event ids, comma-separated"),
                )
                    .into_response();
            }
            // A bundle's evidence is an act of custody, recorded before it is handed out.
            let answer = blocking(move || {
                let evidence = audit.prove_events(&ids, from)?;
                let record = crate::audit::Record::Custody {
                    action: "export".into(),
                    subject: format!(
                        "evidence for {} events ({} records) at checkpoint size {}",
                        ids.len(),
                        evidence.inclusion.len(),
                        audit.open(&evidence.checkpoint)?.size
                    ),
                    by: format!("admin-token:{by}"),
                    at: jiff::Timestamp::now(),
                    detail: listed(&ids, MAX_DETAIL),
                };
                let index = audit.trail.audit_append(&record)?;
                Ok((evidence, index))
            })
            .await;
            return match answer {
                Ok((evidence, index)) => {
                    tracing::info!(index, "audit log: evidence exported, recorded as an act of custody");
                    let mut response = axum::Json(evidence).into_response();
                    if let Some(index) = index.and_then(|i| header::HeaderValue::from_str(&i.to_string()).ok()) {
                        response.headers_mut().insert(CUSTODY_INDEX, index);
                    }
                    response
                }
                Err(response) => response,
            };
        }
        (None, None, Some(index), None) => blocking(move || audit.prove_leaves(&[index])).await,
        (None, None, None, Some(from)) => blocking(move || audit.prove_from(from)).await,
        _ => return (StatusCode::BAD_REQUEST, usage).into_response(),
    };
    match evidence {
        Ok(evidence) => axum::Json(evidence).into_response(),
        Err(response) => response,
    }
}

/// An act of custody to record.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustodyRequest {
    pub action: String,
    pub subject: String,
    #[serde(default)]
    pub detail: String,
}

/// The response header naming the custody record of an export.
pub const CUSTODY_INDEX: &str = "mailhook-custody-index";

/// `ids` space-separated in at most `max` characters, the rest counted.
fn listed(ids: &[String], max: usize) -> String {
    let mut out = String::new();
    for (n, id) in ids.iter().enumerate() {
        let more = format!(" …and {} more", ids.len() - n);
        if out.chars().count() + id.chars().count() + 1 + more.chars().count() > max {
            out.push_str(&more);
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(id);
    }
    out
}

/// Most characters of a custody record's subject, and of its detail.
const MAX_SUBJECT: usize = 512;
const MAX_DETAIL: usize = 4096;

impl CustodyRequest {
    /// What is wrong with it, for the person who sent it.
    fn invalid(&self) -> Option<String> {
        let action_ok = (1..=64).contains(&self.action.len())
            && self
                .action
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !action_ok {
            return Some("action: 1 to 64 of a-z, 0-9 and '-', such as restore".into());
        }
        if self.subject.trim().is_empty() || self.subject.chars().count() > MAX_SUBJECT {
            return Some(format!(
                "subject: say what it is about, at most {MAX_SUBJECT} characters"
            ));
        }
        if self.detail.chars().count() > MAX_DETAIL {
            return Some(format!("detail: at most {MAX_DETAIL} characters"));
        }
        None
    }
}

async fn custody(
    State(api): State<AuditApi>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<axum::Json<CustodyRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let by = match super::admin_only(&api.history, &headers, peer.ip(), "the audit API") {
        Ok(name) => name,
        Err(refused) => return refused.into_response(),
    };
    let request = match body {
        Ok(axum::Json(request)) => request,
        Err(rejected) => {
            let message = format!("send JSON {{\"action\", \"subject\", \"detail\"}}: {rejected}");
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({ "error": message })),
            )
                .into_response();
        }
    };
    if let Some(why) = request.invalid() {
        return (StatusCode::BAD_REQUEST, axum::Json(serde_json::json!({ "error": why }))).into_response();
    }
    let record = crate::audit::Record::Custody {
        action: request.action,
        subject: request.subject,
        by: format!("admin-token:{by}"),
        at: jiff::Timestamp::now(),
        detail: request.detail,
    };
    tracing::info!(by = %by, "audit log: an act of custody recorded");
    let trail = api.audit.trail.clone();
    match blocking(move || Ok(trail.audit_append(&record)?)).await {
        Ok(index) => (StatusCode::CREATED, axum::Json(serde_json::json!({ "index": index }))).into_response(),
        Err(response) => response,
    }
}

/// An archived raw message for a holder of an admin token (legal, compliance): any message
/// still archived, held or not, with no link needed. The fetch is recorded in the audit
/// log as an act of custody before a byte is sent (`mailhook-custody-index`).
async fn raw_message(
    State(api): State<AuditApi>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    axum::extract::Path(sha256): axum::extract::Path<String>,
) -> Response {
    let by = match super::admin_only(&api.history, &headers, peer.ip(), "the audit API") {
        Ok(name) => name,
        Err(refused) => return refused.into_response(),
    };
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({ "error": "name the message by its SHA-256: 64 lower-case hex digits" })),
        )
            .into_response();
    }
    let archive = api.history.deliveries.archive();
    let trail = api.audit.trail.clone();
    let fetched = blocking(move || {
        let Some((_, bytes)) = archive.raw_message(&sha256)? else {
            return Ok(None);
        };
        let record = crate::audit::Record::Custody {
            action: "raw-message.fetch".into(),
            subject: format!("raw-message/{sha256}"),
            by: format!("admin-token:{by}"),
            at: jiff::Timestamp::now(),
            detail: format!("{} bytes", bytes.len()),
        };
        let index = trail.audit_append(&record)?;
        Ok(Some((sha256, index, bytes)))
    })
    .await;
    match fetched {
        Ok(Some((sha256, index, bytes))) => {
            let mut response = (
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, "message/rfc822".to_string()),
                    (header::CACHE_CONTROL, "no-store".to_string()),
                    (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{sha256}.eml\"")),
                ],
                bytes,
            )
                .into_response();
            if let Some(value) = index.and_then(|i| header::HeaderValue::from_str(&i.to_string()).ok()) {
                response.headers_mut().insert("mailhook-custody-index", value);
            }
            response
        }
        Ok(None) => (
            StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({ "error": "no such raw message is archived (never archived, or past --raw-message-retention and held by no LegalHold)" })),
        )
            .into_response(),
        Err(response) => response,
    }
}
