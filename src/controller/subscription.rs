//! WebhookSubscription: dereference (Secrets, filters) → validate (pure) → status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Resource;
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType as K8sEventType;
use kube::{Api, ResourceExt};
use tracing::{debug, info, instrument};

use super::conditions::{self, Desired, READY, Status};
use super::{Context, Error};
use crate::api::{
    MailboxFilter, REPLAY_REQUESTED_AT, REPLAY_SINCE, ReplayStatus, WebhookSubscription, WebhookSubscriptionSpec,
    parse_duration, parse_since,
};
use crate::delivery::signing::SigningKey;
use crate::delivery::{DeliveryConfig, client, payload::PayloadConfig, shard_of};
use crate::route::{CompiledFilter, SubscriptionRoute};

/// Reasons on the `Ready` condition of a WebhookSubscription.
pub mod reason {
    pub const VALID: &str = "Valid";
    pub const PAUSED: &str = "Paused";
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    pub const INVALID_SECRET: &str = "InvalidSecret";
    pub const FILTER_NOT_FOUND: &str = "FilterNotFound";
    pub const INVALID_FILTER: &str = "InvalidFilter";
    pub const INVALID_ENDPOINT: &str = "InvalidEndpoint";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const EGRESS_REFUSED: &str = "EgressRefused";
    pub const ENDPOINT_NOT_VERIFIED: &str = "EndpointNotVerified";
}

/// One thing wrong with a subscription, phrased for the person who has to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

/// A subscription whose references all resolved: what delivery needs.
#[derive(Debug, Clone)]
pub struct ValidSubscription {
    pub endpoint_host: String,
    pub timeout: Duration,
    pub signing_keys: Vec<SigningKey>,
    /// Names of the MailboxFilters it uses (refs and selector), sorted.
    pub filters: Vec<String>,
    pub retry_schedule: Vec<Duration>,
    pub max_retry_after: Duration,
    pub max_event_age: Duration,
    pub dead_letter_retention: Duration,
    pub disable_after: Duration,
    /// Extra headers with values resolved from Secrets.
    pub headers: Vec<(String, String)>,
    /// PEM certificate chain and key for mutual TLS, from clientCertSecretRef.
    pub client_identity: Option<Vec<u8>>,
}

/// What a subscription references, fetched from the cluster.
#[derive(Default)]
pub struct References<'a> {
    /// Every Secret the spec names, by name; absent means not found.
    pub secrets: BTreeMap<String, Secret>,
    /// Every MailboxFilter in the subscription's namespace.
    pub filters: Vec<&'a MailboxFilter>,
}

/// Names of every Secret a spec refers to.
pub fn referenced_secrets(spec: &WebhookSubscriptionSpec) -> Vec<String> {
    let mut names = vec![spec.signing.secret_ref.name.clone()];
    names.extend(
        spec.endpoint
            .headers
            .iter()
            .filter_map(|h| h.value_from.as_ref().map(|v| v.name.clone())),
    );
    names.extend(spec.endpoint.client_cert_secret_ref.as_ref().map(|r| r.name.clone()));
    names.sort();
    names.dedup();
    names
}

/// Checks a subscription against what it references. Pure: every problem is returned,
/// the first one's reason going on the condition.
pub fn validate(spec: &WebhookSubscriptionSpec, refs: &References<'_>) -> Result<ValidSubscription, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut problem = |reason: &'static str, message: String| problems.push(Problem { reason, message });

    let endpoint_host = match url::Url::parse(&spec.endpoint.url) {
        Ok(url) if url.host_str().is_some() && matches!(url.scheme(), "https" | "http") => endpoint_host(&url),
        Ok(_) | Err(_) => {
            problem(
                reason::INVALID_ENDPOINT,
                format!(
                    "spec.endpoint.url {:?} is not an absolute http(s) URL with a host; use one such as https://siem.example.com/hooks",
                    spec.endpoint.url
                ),
            );
            String::new()
        }
    };

    let mut duration = |field: &str, text: &str| match parse_duration(text) {
        Ok(d) => Some(d),
        Err(e) => {
            problem(reason::INVALID_SPEC, format!("{field}: {e}"));
            None
        }
    };
    let timeout = duration("spec.endpoint.timeout", &spec.endpoint.timeout);
    let max_event_age = duration("spec.delivery.maxEventAge", &spec.delivery.max_event_age);
    let max_retry_after = duration("spec.delivery.maxRetryAfter", &spec.delivery.max_retry_after);
    let retry_schedule: Vec<Option<Duration>> = spec
        .delivery
        .retry_schedule
        .iter()
        .enumerate()
        .map(|(i, d)| duration(&format!("spec.delivery.retrySchedule[{i}]"), d))
        .collect();
    let dead_letter_retention = duration(
        "spec.delivery.deadLetterRetention",
        &spec.delivery.dead_letter_retention,
    );
    let disable_after = duration("spec.delivery.disableAfter", &spec.delivery.disable_after);

    let signing_name = &spec.signing.secret_ref.name;
    let signing_keys = match refs.secrets.get(signing_name) {
        None => {
            problem(
                reason::SECRET_NOT_FOUND,
                format!(
                    "Secret {signing_name:?} (spec.signing.secretRef) does not exist in this namespace; create it with a Standard Webhooks key, e.g. `kubectl create secret generic {signing_name} --from-literal=key=whsec_$(openssl rand -base64 32)`"
                ),
            );
            vec![]
        }
        Some(secret) => match signing_keys(secret) {
            Ok(keys) => keys,
            Err(message) => {
                problem(
                    reason::INVALID_SECRET,
                    format!("Secret {signing_name:?} (spec.signing.secretRef) {message}"),
                );
                vec![]
            }
        },
    };

    let mut headers = Vec::new();
    for (i, header) in spec.endpoint.headers.iter().enumerate() {
        if let Some(value) = &header.value {
            headers.push((header.name.clone(), value.clone()));
        }
        if let Some(r) = &header.value_from {
            let field = format!("spec.endpoint.headers[{i}].valueFrom");
            match refs.secrets.get(&r.name) {
                None => problem(
                    reason::SECRET_NOT_FOUND,
                    format!(
                        "Secret {:?} ({field}) does not exist in this namespace; create it or fix the name",
                        r.name
                    ),
                ),
                Some(s) => match secret_value(s, &r.key) {
                    None => problem(
                        reason::INVALID_SECRET,
                        format!(
                            "Secret {:?} ({field}) has no key {:?}; add it or fix valueFrom.key",
                            r.name, r.key
                        ),
                    ),
                    Some(v) => headers.push((header.name.clone(), v.trim_end_matches('\n').to_string())),
                },
            }
        }
    }

    let mut client_identity = None;
    if let Some(r) = &spec.endpoint.client_cert_secret_ref {
        match refs.secrets.get(&r.name) {
            None => problem(
                reason::SECRET_NOT_FOUND,
                format!(
                    "Secret {:?} (spec.endpoint.clientCertSecretRef) does not exist in this namespace; create a kubernetes.io/tls Secret with tls.crt and tls.key",
                    r.name
                ),
            ),
            Some(s) => {
                let missing: Vec<&str> = ["tls.crt", "tls.key"]
                    .into_iter()
                    .filter(|k| secret_value(s, k).is_none_or(|v| !v.contains("-----BEGIN")))
                    .collect();
                if !missing.is_empty() {
                    problem(
                        reason::INVALID_SECRET,
                        format!(
                            "Secret {:?} (spec.endpoint.clientCertSecretRef) lacks a PEM {}; it must hold tls.crt and tls.key",
                            r.name,
                            missing.join(" and ")
                        ),
                    );
                } else if let (Some(crt), Some(key)) = (secret_value(s, "tls.crt"), secret_value(s, "tls.key")) {
                    client_identity = Some(format!("{}\n{}", crt.trim_end(), key).into_bytes());
                }
            }
        }
    }

    if let Some(bundle) = &spec.endpoint.ca_bundle
        && !bundle.contains("-----BEGIN CERTIFICATE-----")
    {
        problem(
            reason::INVALID_ENDPOINT,
            "spec.endpoint.caBundle holds no PEM certificate (-----BEGIN CERTIFICATE-----); paste the CA's PEM text"
                .to_string(),
        );
    }

    let mut filters = Vec::new();
    for name in &spec.filter_refs {
        match refs.filters.iter().find(|f| &f.name_any() == name) {
            None => problem(
                reason::FILTER_NOT_FOUND,
                format!(
                    "MailboxFilter {name:?} (spec.filterRefs) does not exist in this namespace; create it or remove the reference"
                ),
            ),
            Some(f) => match CompiledFilter::compile(&f.spec) {
                Ok(_) => filters.push(name.clone()),
                Err(e) => problem(
                    reason::INVALID_FILTER,
                    format!("MailboxFilter {name:?} is invalid ({e}); fix the filter"),
                ),
            },
        }
    }
    if let Some(selector) = &spec.filter_selector {
        match Selector::try_from(selector.clone()) {
            Err(e) => problem(
                reason::INVALID_SPEC,
                format!("spec.filterSelector is not a valid label selector: {e}"),
            ),
            Ok(selector) => {
                let selected: Vec<&&MailboxFilter> =
                    refs.filters.iter().filter(|f| selector.matches(f.labels())).collect();
                if selected.is_empty() {
                    problem(
                        reason::FILTER_NOT_FOUND,
                        "spec.filterSelector matches no MailboxFilter in this namespace; label a filter to match it or change the selector".to_string(),
                    );
                }
                for f in selected {
                    match CompiledFilter::compile(&f.spec) {
                        Ok(_) => filters.push(f.name_any()),
                        Err(e) => problem(
                            reason::INVALID_FILTER,
                            format!(
                                "MailboxFilter {:?} (selected by spec.filterSelector) is invalid ({e}); fix the filter",
                                f.name_any()
                            ),
                        ),
                    }
                }
            }
        }
    }
    filters.sort();
    filters.dedup();

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(ValidSubscription {
        endpoint_host,
        timeout: timeout.unwrap_or_default(),
        signing_keys,
        filters,
        retry_schedule: retry_schedule.into_iter().flatten().collect(),
        max_event_age: max_event_age.unwrap_or_default(),
        max_retry_after: max_retry_after.unwrap_or_default(),
        dead_letter_retention: dead_letter_retention.unwrap_or_default(),
        disable_after: disable_after.unwrap_or_default(),
        headers,
        client_identity,
    })
}

pub fn endpoint_host(url: &url::Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_string(),
        _ => String::new(),
    }
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(v.0.clone()).ok();
    }
    secret.string_data.as_ref().and_then(|d| d.get(key)).cloned()
}

/// Every value of the Secret must be a signing key: `whsec_<base64>` (HMAC, v1) or
/// `whsk_<base64>` (ed25519, v1a).
fn signing_keys(secret: &Secret) -> Result<Vec<SigningKey>, String> {
    let data = secret.data.clone().unwrap_or_default();
    if data.is_empty() {
        return Err("holds no keys; add one such as key=whsec_<base64 of 24 to 64 random bytes>".to_string());
    }
    data.iter()
        .map(|(key, value)| {
            let text = std::str::from_utf8(&value.0).map_err(|_| format!("key {key:?} is not text"))?;
            SigningKey::parse(text).map_err(|e| format!("key {key:?} {e}"))
        })
        .collect()
}

/// `Stalled` or `Reconciling` for a subscription's `Ready` (kstatus). Paused is a choice,
/// not a failure; an unverified endpoint is on its way; every other `Ready=False` waits
/// for a change to the subscription or what it references. Pure.
pub fn progress(ready: &Desired) -> Option<Desired> {
    conditions::progress(
        ready,
        ready.reason == reason::ENDPOINT_NOT_VERIFIED,
        ready.reason != reason::PAUSED,
    )
}

/// The `Ready` condition for a validation outcome. Pure.
pub fn ready_condition(spec: &WebhookSubscriptionSpec, outcome: &Result<ValidSubscription, Vec<Problem>>) -> Desired {
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
            let reason = problems.first().map_or(reason::INVALID_SPEC, |p| p.reason);
            Desired { type_: READY, status: Status::False, reason, message }
        }
        Ok(_) if spec.paused => Desired {
            type_: READY,
            status: Status::False,
            reason: reason::PAUSED,
            message: "Deliveries are paused (spec.paused: true); matching events keep queueing. Set spec.paused to false to resume.".to_string(),
        },
        Ok(valid) => Desired {
            type_: READY,
            status: Status::True,
            reason: reason::VALID,
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

/// The shard-side configuration of a valid subscription.
fn delivery_config(
    whs: &WebhookSubscription,
    uid: &str,
    valid: &ValidSubscription,
    ctx: &Context,
) -> Result<DeliveryConfig, Problem> {
    let client = client::build(client::ClientSettings {
        timeout: valid.timeout,
        headers: &valid.headers,
        ca_bundle: whs.spec.endpoint.ca_bundle.as_deref(),
        identity: valid.client_identity.as_deref(),
        insecure_skip_verify: whs.spec.endpoint.insecure_skip_tls_verify,
        egress: ctx.egress.clone(),
    })
    .map_err(|message| Problem {
        reason: if message.contains("clientCertSecretRef") {
            reason::INVALID_SECRET
        } else {
            reason::INVALID_ENDPOINT
        },
        message,
    })?;
    let (pseudonym_secret, raw_links) = (&ctx.pseudonym_secret, ctx.raw_links.as_ref());
    let spec = &whs.spec;
    Ok(DeliveryConfig {
        uid: uid.to_string(),
        namespace: whs.namespace().unwrap_or_default(),
        name: whs.name_any(),
        generation: whs.metadata.generation.unwrap_or_default(),
        url: spec.endpoint.url.clone(),
        client,
        egress: ctx.egress.clone(),
        timeout: valid.timeout,
        signing_keys: valid.signing_keys.clone(),
        retry_schedule: valid.retry_schedule.clone(),
        max_event_age: valid.max_event_age,
        max_retry_after: valid.max_retry_after,
        dead_letter_retention: valid.dead_letter_retention,
        disable_after: valid.disable_after,
        payload: PayloadConfig {
            mode: spec.payload.mode,
            redact: spec.payload.redact.clone(),
            pseudonym_key: crate::delivery::signing::pseudonym(pseudonym_secret, uid).into_bytes(),
            raw_links: raw_links.filter(|_| spec.payload.include_raw_message_link).cloned(),
        },
        concurrency: spec.delivery.concurrency,
        rate_limit_per_second: spec.delivery.rate_limit_per_second,
        ordered: spec.delivery.ordering == crate::api::Ordering::PerMailbox,
        paused: spec.paused,
    })
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
async fn replay(
    ctx: &Context,
    whs: &WebhookSubscription,
    uid: &str,
    request: ReplayRequest,
) -> Result<ReplayStatus, Error> {
    let now = jiff::Timestamp::now();
    let (replayed, since, message, ok) = match request.since {
        Err(problem) => (0, None, format!("Nothing replayed: {problem}."), false),
        Ok(since) => {
            let deliveries = ctx.deliveries.clone();
            let id = uid.to_string();
            let from = since.unwrap_or(jiff::Timestamp::MIN);
            let n = tokio::task::spawn_blocking(move || deliveries.replay(&id, from))
                .await
                .map_err(|e| Error::Replay(e.to_string()))?
                .map_err(|e| Error::Replay(e.to_string()))?;
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

#[instrument(skip_all, fields(namespace = whs.namespace().unwrap_or_default(), name = whs.name_any()))]
pub async fn reconcile(whs: Arc<WebhookSubscription>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let ns = whs.namespace().ok_or(Error::NotNamespaced)?;
    let uid = whs.uid().ok_or(Error::NotNamespaced)?;
    // Filters not yet listed would look like FilterNotFound.
    ctx.filters.synced_for(&ns).await?;

    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut refs = References::default();
    for name in referenced_secrets(&whs.spec) {
        if let Some(secret) = secrets_api.get_opt(&name).await.map_err(Error::Kube)? {
            refs.secrets.insert(name, secret);
        }
    }
    let filters = ctx.filters.state();
    refs.filters = filters
        .iter()
        .filter(|f| f.namespace().as_deref() == Some(&ns))
        .map(|f| f.as_ref())
        .collect();

    let mut outcome = validate(&whs.spec, &refs);
    if outcome.is_ok()
        && let Ok(url) = url::Url::parse(&whs.spec.endpoint.url)
    {
        // Bounded: a slow resolver must not hold up the reconcile loop.
        let checked = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            crate::delivery::egress::check_host(&ctx.egress, &url),
        )
        .await;
        if let Ok(Err(refused)) = checked {
            outcome = Err(vec![Problem {
                reason: reason::EGRESS_REFUSED,
                message: format!("spec.endpoint.url: {refused}. Deliveries are not attempted."),
            }]);
        }
    }
    let mut config = match &outcome {
        Ok(valid) => match delivery_config(&whs, &uid, valid, &ctx) {
            Ok(c) => Some(c),
            Err(problem) => {
                outcome = Err(vec![problem]);
                None
            }
        },
        Err(_) => None,
    };
    let route = match (&outcome, &config) {
        (Ok(valid), Some(_)) => Some(SubscriptionRoute {
            uid: uid.clone(),
            namespace: ns.clone(),
            event_types: whs.spec.event_types.clone(),
            filters: valid.filters.clone(),
        }),
        _ => None,
    };
    // Opt-in endpoint verification: once per URL per process; until then events queue.
    let previously_verified = ctx
        .state
        .lock()
        .ok()
        .and_then(|s| s.subscriptions.get(&uid).and_then(|s| s.verified_url.clone()));
    let mut verified_url = None;
    let mut not_verified = None;
    if let Some(c) = config.as_mut().filter(|_| whs.spec.endpoint.verify) {
        if previously_verified.as_deref() == Some(c.url.as_str()) {
            verified_url = previously_verified.clone();
        } else {
            match crate::delivery::verification::handshake(c).await {
                Ok(()) => {
                    info!(url = c.url, "endpoint verified");
                    verified_url = Some(c.url.clone());
                }
                Err(why) => {
                    c.paused = true;
                    not_verified = Some(why);
                }
            }
        }
    }
    match config {
        Some(c) => ctx.deliveries.upsert(c),
        None => ctx.deliveries.park(&uid),
    }
    let ready = match &not_verified {
        Some(why) => Desired {
            type_: READY,
            status: Status::False,
            reason: reason::ENDPOINT_NOT_VERIFIED,
            message: format!(
                "{why}. spec.endpoint.verify is set: the endpoint must answer the signed POST of type endpoint.verification with {{\"challenge\": <data.challenge>}}. Events queue meanwhile; retrying every {}s.",
                VERIFY_RETRY.as_secs()
            ),
        },
        None => ready_condition(&whs.spec, &outcome),
    };
    let signing_public_keys = outcome
        .as_ref()
        .map(|v| v.signing_keys.iter().filter_map(SigningKey::public_key).collect())
        .unwrap_or_default();
    debug!(ready = ?ready.status, reason = ready.reason, "validated");
    let stalled = progress(&ready).is_some_and(|p| p.type_ == conditions::STALLED);
    let egress_refused = ready.reason == reason::EGRESS_REFUSED;
    ctx.directory.set(&ns, &whs.name_any(), &uid);

    let mut last_replay = ctx
        .state
        .lock()
        .ok()
        .and_then(|s| s.subscriptions.get(&uid).and_then(|s| s.last_replay.clone()));
    let handled = last_replay
        .as_ref()
        .or(whs.status.as_ref().and_then(|s| s.last_replay.as_ref()))
        .map(|r| r.requested_at.clone());
    if let Some(request) = replay_request(whs.annotations(), handled.as_deref(), jiff::Timestamp::now()) {
        last_replay = Some(replay(&ctx, &whs, &uid, request).await?);
    }
    if let Ok(mut state) = ctx.state.lock() {
        state.subscriptions.insert(
            uid.clone(),
            super::SubscriptionState {
                generation: whs.metadata.generation,
                endpoint_host: url::Url::parse(&whs.spec.endpoint.url).ok().map(|u| endpoint_host(&u)),
                ready,
                route,
                shard: shard_of(&uid, ctx.deliveries.shard_count()) as u32,
                paused: whs.spec.paused,
                last_replay,
                signing_public_keys,
                insecure_skip_tls_verify: whs.spec.endpoint.insecure_skip_tls_verify,
                verified_url,
            },
        );
    }
    ctx.rebuild_routes();
    ctx.status_changed.notify_one();
    ctx.metrics
        .reconcile_duration
        .with_label_values(&["WebhookSubscription"])
        .observe(started.elapsed().as_secs_f64());
    if not_verified.is_some() {
        return Ok(Action::requeue(VERIFY_RETRY));
    }
    // Stalled: nothing changes until the subscription, a Secret or a filter does, and each
    // of those is watched. An egress refusal depends on DNS, which is not: re-check it.
    if stalled && !egress_refused {
        return Ok(Action::await_change());
    }
    // Periodic re-check catches what no watch reports (e.g. a filter losing a label).
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// How often an endpoint that did not echo the verification challenge is asked again.
const VERIFY_RETRY: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Endpoint, EventType, MailboxFilterSpec, MatchCriteria, SecretRef, Signing, SubjectMatch};
    use k8s_openapi::ByteString;

    fn spec() -> WebhookSubscriptionSpec {
        WebhookSubscriptionSpec {
            endpoint: Endpoint {
                url: "https://siem.example.com:8443/hooks".into(),
                allow_insecure_http: false,
                timeout: "10s".into(),
                headers: vec![],
                ca_bundle: None,
                client_cert_secret_ref: None,
                insecure_skip_tls_verify: false,
                verify: false,
            },
            signing: Signing {
                secret_ref: SecretRef { name: "signing".into() },
            },
            event_types: vec![EventType::MessageReceived],
            filter_refs: vec![],
            filter_selector: None,
            payload: Default::default(),
            delivery: Default::default(),
            paused: false,
        }
    }

    fn secret(pairs: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    const KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn refs_with_signing<'a>(value: &str) -> References<'a> {
        References {
            secrets: [("signing".to_string(), secret(&[("key", value)]))].into(),
            filters: vec![],
        }
    }

    #[test]
    fn valid_subscription_resolves_keys_and_host() {
        let v = validate(&spec(), &refs_with_signing(KEY)).expect("valid");
        assert_eq!(v.endpoint_host, "siem.example.com:8443");
        assert_eq!(v.signing_keys.len(), 1);
        assert!(matches!(&v.signing_keys[0], SigningKey::Hmac(k) if k.len() == 24));
        assert_eq!(v.retry_schedule.len(), 8);
        assert_eq!(v.timeout, Duration::from_secs(10));
        assert!(!format!("{v:?}").contains("MfKQ"), "Debug must not leak key material");
    }

    #[test]
    fn missing_secret_says_how_to_create_it() {
        let problems = validate(&spec(), &References::default()).unwrap_err();
        assert_eq!(problems[0].reason, reason::SECRET_NOT_FOUND);
        assert!(problems[0].message.contains("kubectl create secret generic signing"));
    }

    #[test]
    fn malformed_keys_are_invalid_secrets() {
        for (value, hint) in [
            ("not-a-key", "must start with whsec_"),
            ("whsec_!!!", "not valid base64"),
            ("whsec_c2hvcnQ=", "decodes to 5 bytes"),
        ] {
            let problems = validate(&spec(), &refs_with_signing(value)).unwrap_err();
            assert_eq!(problems[0].reason, reason::INVALID_SECRET, "{value}");
            assert!(problems[0].message.contains(hint), "{}", problems[0].message);
        }
    }

    #[test]
    fn filters_must_exist_and_compile() {
        let good = MailboxFilter::new("finance", MailboxFilterSpec::default());
        let bad = MailboxFilter::new(
            "broken",
            MailboxFilterSpec {
                criteria: MatchCriteria {
                    subject: Some(SubjectMatch {
                        keywords: vec![],
                        regex: Some("(".into()),
                    }),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        let mut s = spec();
        s.filter_refs = vec!["finance".into(), "missing".into(), "broken".into()];
        let mut refs = refs_with_signing(KEY);
        refs.filters = vec![&good, &bad];
        let problems = validate(&s, &refs).unwrap_err();
        let reasons: Vec<_> = problems.iter().map(|p| p.reason).collect();
        assert_eq!(reasons, vec![reason::FILTER_NOT_FOUND, reason::INVALID_FILTER]);

        s.filter_refs = vec!["finance".into()];
        assert_eq!(validate(&s, &refs).expect("valid").filters, vec!["finance"]);
    }

    #[test]
    fn invalid_is_stalled_paused_is_not_and_verifying_is_reconciling() {
        let ready = |reason| Desired {
            type_: READY,
            status: Status::False,
            reason,
            message: String::new(),
        };
        let kind = |reason| progress(&ready(reason)).map(|p| p.type_);
        for stalled in [
            reason::SECRET_NOT_FOUND,
            reason::INVALID_SECRET,
            reason::FILTER_NOT_FOUND,
            reason::INVALID_FILTER,
            reason::INVALID_ENDPOINT,
            reason::INVALID_SPEC,
            reason::EGRESS_REFUSED,
        ] {
            assert_eq!(kind(stalled), Some(conditions::STALLED), "{stalled}");
        }
        assert_eq!(kind(reason::PAUSED), None);
        assert_eq!(kind(reason::ENDPOINT_NOT_VERIFIED), Some(conditions::RECONCILING));
    }

    #[test]
    fn ready_reports_first_reason_and_paused() {
        let ready = ready_condition(&spec(), &validate(&spec(), &References::default()));
        assert_eq!((ready.status, ready.reason), (Status::False, reason::SECRET_NOT_FOUND));

        let mut paused = spec();
        paused.paused = true;
        let ready = ready_condition(&paused, &validate(&paused, &refs_with_signing(KEY)));
        assert_eq!((ready.status, ready.reason), (Status::False, reason::PAUSED));
        let ready = ready_condition(&spec(), &validate(&spec(), &refs_with_signing(KEY)));
        assert_eq!((ready.status, ready.reason), (Status::True, reason::VALID));
    }
}
