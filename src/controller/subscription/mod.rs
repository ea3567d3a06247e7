//! WebhookSubscription reconcile, in five steps: `dereference` (read Secrets and
//! filters, resolve the endpoint) → `validate` (pure) → `build` (the delivery
//! configuration and route) → `apply` (hand them to the data path) → status (record what
//! was decided; the status writer shows it once it is routed). Each step has its own
//! error type; what is wrong with the resource is a `Problem` on its status, never an
//! error, and its reason comes from the step and variant that found it.

mod build;
mod dereference;
mod replay;
mod validate;

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::controller::Action;
use tracing::{debug, instrument};

use super::conditions::{self, Desired, READY, Status};
use super::{Context, Error, SubscriptionState};
use crate::api::{WebhookSubscription, WebhookSubscriptionSpec};
use crate::delivery::shard_of;
use crate::delivery::signing::SigningKey;
use crate::delivery::verification::Verification;
use crate::route::SubscriptionRoute;

pub use build::{BuildError, BuildSettings, Built, build};
pub use dereference::{DereferenceError, FilterRef, References, dereference, referenced_secrets};
pub use replay::{ReplayError, ReplayRequest, replay_request};
pub use validate::{Problem, ValidSubscription, authorize, endpoint_host, validate};

/// Reasons on the `Ready` condition of a WebhookSubscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Valid,
    Paused,
    SecretNotFound,
    InvalidSecret,
    FilterNotFound,
    InvalidFilter,
    InvalidEndpoint,
    InvalidSpec,
    EgressRefused,
    EndpointNotVerified,
    /// No MailboxGrant covers the namespace, or the subscription asks for more than its
    /// grants allow.
    NotGranted,
}

impl Reason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Valid => "Valid",
            Reason::Paused => "Paused",
            Reason::SecretNotFound => "SecretNotFound",
            Reason::InvalidSecret => "InvalidSecret",
            Reason::FilterNotFound => "FilterNotFound",
            Reason::InvalidFilter => "InvalidFilter",
            Reason::InvalidEndpoint => "InvalidEndpoint",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::EgressRefused => "EgressRefused",
            Reason::EndpointNotVerified => "EndpointNotVerified",
            Reason::NotGranted => "NotGranted",
        }
    }
}

impl conditions::Reason for Reason {
    fn as_str(&self) -> &'static str {
        Reason::as_str(self)
    }
}

/// `Stalled` or `Reconciling` for a subscription's `Ready` (kstatus). Paused is a choice,
/// not a failure; an unverified endpoint is on its way; every other `Ready=False` waits
/// for a change to the subscription or what it references. Pure.
pub fn progress(ready: &Desired<Reason>) -> Option<Desired<Reason>> {
    conditions::progress(
        ready,
        ready.reason == Reason::EndpointNotVerified,
        ready.reason != Reason::Paused,
    )
}

/// The `Ready` condition for a validation outcome. Pure.
pub fn ready_condition(
    spec: &WebhookSubscriptionSpec,
    outcome: &Result<ValidSubscription, Vec<Problem>>,
) -> Desired<Reason> {
    match outcome {
        Err(problems) => {
            let message = match problems.as_slice() {
                [one] => one.message.clone(),
                many => format!(
                    "{} problems: {}",
                    many.len(),
                    many.iter().map(|p| p.message.as_str()).collect::<Vec<_>>().join("; ")
                ),
            };
            let reason = problems.first().map_or(Reason::InvalidSpec, |p| p.reason);
            Desired { type_: READY, status: Status::False, reason, message }
        }
        Ok(_) if spec.paused => Desired {
            type_: READY,
            status: Status::False,
            reason: Reason::Paused,
            message: "Deliveries are paused (spec.paused: true); matching events keep queueing. Set spec.paused to false to resume.".to_string(),
        },
        Ok(valid) => Desired {
            type_: READY,
            status: Status::True,
            reason: Reason::Valid,
            message: format!(
                "Configuration is valid and routed: {} signing key(s), {} filter(s).{}",
                valid.signing_keys.len(),
                valid.filters.len(),
                if spec.endpoint.insecure_skip_tls_verify {
                    " WARNING: endpoint.insecureSkipTLSVerify is true: the endpoint's certificate is not checked, so anyone on the network path can read and alter deliveries; set a caBundle instead."
                } else {
                    ""
                }
            ),
        },
    }
}

/// `Ready` once the data path has tried the endpoint verification handshake
/// (`endpoint.verify`): a valid subscription is Ready only once its endpoint echoed the
/// challenge. Pure.
pub fn with_verification(ready: Desired<Reason>, verification: Option<&Verification>) -> Desired<Reason> {
    if ready.status != Status::True {
        return ready;
    }
    match verification {
        None | Some(Verification::Verified) => ready,
        Some(Verification::Pending) => Desired {
            type_: READY,
            status: Status::Unknown,
            reason: Reason::EndpointNotVerified,
            message:
                "Sending the verification challenge to the endpoint (spec.endpoint.verify); events queue meanwhile."
                    .to_string(),
        },
        Some(Verification::Failed(why)) => Desired {
            type_: READY,
            status: Status::False,
            reason: Reason::EndpointNotVerified,
            message: format!(
                "{why}. spec.endpoint.verify is set: the endpoint must answer the signed POST of type endpoint.verification with {{\"challenge\": <data.challenge>}}. Events queue meanwhile; retrying every {}s.",
                crate::delivery::verification::RETRY.as_secs()
            ),
        },
    }
}

/// Step 4: hands a built subscription to the data path, or stops delivering for one that
/// is not valid (its queue stays). Returns the route to record.
fn apply(ctx: &Context, uid: &str, built: Option<Built>) -> Option<SubscriptionRoute> {
    match built {
        Some(Built { config, route }) => {
            ctx.deliveries.upsert(config);
            Some(route)
        }
        None => {
            ctx.deliveries.park(uid);
            None
        }
    }
}

/// What comes after a reconcile. Stalled: nothing changes until the subscription, a
/// Secret or a filter does, and each of those is watched — except DNS, which is not, so
/// an egress refusal is checked again. Otherwise a periodic re-check catches what no
/// watch reports.
fn next(ready: &Desired<Reason>) -> Action {
    let stalled = progress(ready).is_some_and(|p| p.type_ == conditions::STALLED);
    if stalled && ready.reason != Reason::EgressRefused {
        return Action::await_change();
    }
    Action::requeue(Duration::from_secs(300))
}

#[instrument(skip_all, fields(namespace = whs.namespace().unwrap_or_default(), name = whs.name_any()))]
pub async fn reconcile(whs: Arc<WebhookSubscription>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let ns = whs.namespace().ok_or(Error::NotNamespaced)?;
    let uid = whs.uid().ok_or(Error::NotNamespaced)?;

    // Until the grants are known, nothing can be judged granted.
    let mut synced = ctx.grants_synced.subscribe();
    match tokio::time::timeout(Duration::from_secs(30), synced.wait_for(|s| *s)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return Err(Error::StoreClosed),
        Err(_) => return Err(Error::GrantsNotListed),
    }
    let refs = dereference(&ctx, &whs, &ns).await?;
    let mut outcome = validate(&whs.spec, &refs);
    let covering = ctx.state.lock().grants_of(&ns);
    let mut grants = Vec::new();
    if outcome.is_ok() {
        match authorize(&whs.spec, &ns, &covering) {
            Ok(names) => grants = names,
            Err(problem) => outcome = Err(vec![problem]),
        }
    }
    let built = match &outcome {
        Ok(valid) => match build(&whs, &uid, valid, &ctx.build) {
            Ok(built) => Some(built),
            Err(e) => {
                outcome = Err(vec![e.problem()]);
                None
            }
        },
        Err(_) => None,
    };
    let ready = ready_condition(&whs.spec, &outcome);
    debug!(ready = ?ready.status, reason = ready.reason.as_str(), "validated");

    ctx.directory.set(&ns, &whs.name_any(), &uid);
    let backlog_cap = built.as_ref().and_then(|b| b.config.max_backlog);
    let route = apply(&ctx, &uid, built);

    let mut last_replay = ctx
        .state
        .lock()
        .subscriptions
        .get(&uid)
        .and_then(|s| s.last_replay.clone());
    let handled = last_replay
        .as_ref()
        .or(whs.status.as_ref().and_then(|s| s.last_replay.as_ref()))
        .map(|r| r.requested_at.clone());
    // On a shared store the dead letters are held by the shard's owner: it replays, and
    // its outcome reaches status through the health it publishes.
    if let Some(request) = replay_request(whs.annotations(), handled.as_deref(), jiff::Timestamp::now())
        && ctx.deliveries.owns(&uid)
    {
        let done = replay::replay(&ctx, &whs, &uid, request).await?;
        if let Ok(value) = serde_json::to_value(&done) {
            ctx.deliveries.note_replay(&uid, value);
        }
        last_replay = Some(done);
    }

    let mut uses: Vec<String> = refs.filters.iter().map(|f| f.name.clone()).collect();
    uses.sort();
    uses.dedup();
    let action = next(&ready);
    ctx.record_subscription(
        uid.clone(),
        SubscriptionState {
            generation: whs.metadata.generation,
            endpoint_host: url::Url::parse(&whs.spec.endpoint.url).ok().map(|u| endpoint_host(&u)),
            signing_public_keys: outcome
                .as_ref()
                .map(|v| v.signing_keys.iter().filter_map(SigningKey::public_key).collect())
                .unwrap_or_default(),
            encryption_key_id: outcome
                .as_ref()
                .ok()
                .and_then(|v| v.encryption.as_ref())
                .map(|k| k.key_id().to_string()),
            ready,
            route,
            shard: shard_of(&uid, ctx.deliveries.shard_count()) as u32,
            paused: whs.spec.paused,
            last_replay,
            insecure_skip_tls_verify: whs.spec.endpoint.insecure_skip_tls_verify,
            uses,
            grants,
            backlog_cap,
            version: 0,
        },
    );
    ctx.metrics
        .reconcile_duration
        .with_label_values(&["WebhookSubscription"])
        .observe(started.elapsed().as_secs_f64());
    Ok(action)
}
