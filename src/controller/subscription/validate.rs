//! Step 2 of a subscription's reconcile: check it against what it references. Pure: every
//! problem is returned, phrased for the person who has to fix it.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::core::{Selector, SelectorExt};

use super::Reason;
use super::dereference::{FilterRef, References};
use crate::api::{WebhookSubscriptionSpec, parse_bytes, parse_duration};
use crate::delivery::encryption::EncryptionKeys;
use crate::delivery::signing::SigningKey;
use crate::delivery::{BatchSettings, Sink};
use crate::store::BacklogCap;

/// One thing wrong with a subscription, phrased for the person who has to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: Reason,
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
    /// The receiver's public keys (`payload.encryption`).
    pub encryption: Option<EncryptionKeys>,
    pub batch: Option<BatchSettings>,
    pub dead_letter_sink: Option<Sink>,
    /// `delivery.maxBacklog` as the spec gives it: a figure left out is None here and takes
    /// the operator's default when built.
    pub max_backlog: BacklogCap,
}

/// Checks a subscription in `namespace` against the grants that cover that namespace
/// (by name) and any of the event types it asks for: what it may receive, and at most how.
/// Returns the names of the grants it receives through. Pure.
pub fn authorize(
    spec: &WebhookSubscriptionSpec,
    namespace: &str,
    grants: &[std::sync::Arc<crate::route::CompiledGrant>],
) -> Result<Vec<String>, Problem> {
    let not_granted = |message: String| Problem {
        reason: Reason::NotGranted,
        message,
    };
    if grants.is_empty() {
        return Err(not_granted(format!(
            "No MailboxGrant covers namespace {namespace}, so this subscription receives nothing. \
             Mail belongs to the organisation: ask a cluster admin for a MailboxGrant that lists \
             {namespace} in spec.namespaces (or selects it with spec.namespaceSelector) and names \
             the mailboxes or domains it may receive (kubectl explain mailboxgrant.spec)."
        )));
    }
    let grants: Vec<&std::sync::Arc<crate::route::CompiledGrant>> =
        grants.iter().filter(|g| g.takes_any(&spec.event_types)).collect();
    let Some(widest) = grants.iter().map(|g| g.ceiling).reduce(crate::route::Ceiling::join) else {
        let asked: Vec<&str> = spec.event_types.iter().map(|t| t.as_str()).collect();
        return Err(not_granted(format!(
            "spec.eventTypes: the MailboxGrants of namespace {namespace} grant none of {}, so this \
             subscription receives nothing. Ask for a granted type, or ask a cluster admin to add \
             one of these to a grant's eventTypes.",
            asked.join(", ")
        )));
    };
    let names = || grants.iter().map(|g| g.name.as_str()).collect::<Vec<_>>().join(", ");
    let asked = spec.payload.mode;
    if asked.rank() > widest.mode.rank() {
        return Err(not_granted(format!(
            "spec.payload.mode: {} is fuller than the MailboxGrants of namespace {namespace} ({}) \
             allow; the fullest is {}. Set spec.payload.mode to {}, or ask a cluster admin to \
             raise maxPayloadMode on a grant for {namespace}.",
            asked.as_str(),
            names(),
            widest.mode.as_str(),
            widest.mode.as_str()
        )));
    }
    if spec.payload.include_raw_message_link && !widest.raw_links {
        return Err(not_granted(format!(
            "spec.payload.includeRawMessageLink: no MailboxGrant of namespace {namespace} ({}) \
             allows raw message links. Remove it, or ask a cluster admin to set \
             rawMessageLinks: true on a grant for {namespace}.",
            names()
        )));
    }
    Ok(grants.iter().map(|g| g.name.clone()).collect())
}

/// Checks a subscription against what it references. Pure: every problem is returned,
/// the first one's reason going on the condition.
pub fn validate(spec: &WebhookSubscriptionSpec, refs: &References) -> Result<ValidSubscription, Vec<Problem>> {
    // The steps run in this order because the first problem found names the condition's
    // reason.
    let mut problems = Problems::default();
    let endpoint_host = endpoint_url(spec, &mut problems);
    let durations = durations(spec, &mut problems);
    let signing_keys = signing(spec, refs, &mut problems);
    let headers = headers(spec, refs, &mut problems);
    let client_identity = client_identity(spec, refs, &mut problems);
    ca_bundle(spec, &mut problems);
    let filters = filters(spec, refs, &mut problems);
    redactions(spec, &mut problems);
    let encryption = encryption(spec, refs, &mut problems);
    let batch = batch(spec, durations.max_event_age, &mut problems);
    let dead_letter_sink = dead_letter_sink(spec, &mut problems);
    let max_backlog = max_backlog(spec, &mut problems);

    if !problems.0.is_empty() {
        return Err(problems.0);
    }
    // Checked last: a refused host matters only once nothing else is wrong.
    if let Some(refused) = &refs.egress_refused {
        return Err(vec![Problem {
            reason: Reason::EgressRefused,
            message: format!("{refused}. Deliveries are not attempted."),
        }]);
    }
    Ok(ValidSubscription {
        endpoint_host,
        timeout: durations.timeout.unwrap_or_default(),
        signing_keys,
        filters,
        retry_schedule: durations.retry_schedule,
        max_event_age: durations.max_event_age.unwrap_or_default(),
        max_retry_after: durations.max_retry_after.unwrap_or_default(),
        dead_letter_retention: durations.dead_letter_retention.unwrap_or_default(),
        disable_after: durations.disable_after.unwrap_or_default(),
        headers,
        client_identity,
        encryption,
        batch,
        dead_letter_sink,
        max_backlog,
    })
}

/// The problems found so far, in the order found.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, reason: Reason, message: String) {
        self.0.push(Problem { reason, message });
    }
}

/// `spec.endpoint.url`: its host (and port), empty when it is not usable.
fn endpoint_url(spec: &WebhookSubscriptionSpec, problems: &mut Problems) -> String {
    match url::Url::parse(&spec.endpoint.url) {
        Ok(url) if url.host_str().is_some() && matches!(url.scheme(), "https" | "http") => endpoint_host(&url),
        Ok(_) | Err(_) => {
            problems.push(
                Reason::InvalidEndpoint,
                format!(
                    "spec.endpoint.url {:?} is not an absolute http(s) URL with a host; use one such as https://siem.example.com/hooks",
                    spec.endpoint.url
                ),
            );
            String::new()
        }
    }
}

/// The durations of the spec, each None when it does not parse (the retry schedule
/// keeps the ones that do).
struct Durations {
    timeout: Option<Duration>,
    max_event_age: Option<Duration>,
    max_retry_after: Option<Duration>,
    retry_schedule: Vec<Duration>,
    dead_letter_retention: Option<Duration>,
    disable_after: Option<Duration>,
}

fn durations(spec: &WebhookSubscriptionSpec, problems: &mut Problems) -> Durations {
    let mut duration = |field: &str, text: &str| match parse_duration(text) {
        Ok(d) => Some(d),
        Err(e) => {
            problems.push(Reason::InvalidSpec, format!("{field}: {e}"));
            None
        }
    };
    let delivery = &spec.delivery;
    let timeout = duration("spec.endpoint.timeout", &spec.endpoint.timeout);
    let max_event_age = duration("spec.delivery.maxEventAge", &delivery.max_event_age);
    let max_retry_after = duration("spec.delivery.maxRetryAfter", &delivery.max_retry_after);
    let retry_schedule = delivery
        .retry_schedule
        .iter()
        .enumerate()
        .filter_map(|(i, d)| duration(&format!("spec.delivery.retrySchedule[{i}]"), d))
        .collect();
    let dead_letter_retention = duration("spec.delivery.deadLetterRetention", &delivery.dead_letter_retention);
    let disable_after = duration("spec.delivery.disableAfter", &delivery.disable_after);
    Durations {
        timeout,
        max_event_age,
        max_retry_after,
        retry_schedule,
        dead_letter_retention,
        disable_after,
    }
}

/// `spec.signing.secretRef`: the signing keys, none when the Secret is missing or bad.
fn signing(spec: &WebhookSubscriptionSpec, refs: &References, problems: &mut Problems) -> Vec<SigningKey> {
    let signing_name = &spec.signing.secret_ref.name;
    match refs.secrets.get(signing_name) {
        None => {
            problems.push(
                Reason::SecretNotFound,
                format!(
                    "Secret {signing_name:?} (spec.signing.secretRef) does not exist in this namespace; create it with a Standard Webhooks key, e.g. `kubectl create secret generic {signing_name} --from-literal=key=whsec_$(openssl rand -base64 32)`"
                ),
            );
            vec![]
        }
        Some(secret) => match signing_keys(secret) {
            Ok(keys) => keys,
            Err(message) => {
                problems.push(
                    Reason::InvalidSecret,
                    format!("Secret {signing_name:?} (spec.signing.secretRef) {message}"),
                );
                vec![]
            }
        },
    }
}

/// `spec.endpoint.headers`: name and value of each, values from Secrets resolved.
fn headers(spec: &WebhookSubscriptionSpec, refs: &References, problems: &mut Problems) -> Vec<(String, String)> {
    let mut headers = Vec::new();
    for (i, header) in spec.endpoint.headers.iter().enumerate() {
        if let Some(value) = &header.value {
            headers.push((header.name.clone(), value.clone()));
        }
        if let Some(r) = &header.value_from {
            let field = format!("spec.endpoint.headers[{i}].valueFrom");
            match refs.secrets.get(&r.name) {
                None => problems.push(
                    Reason::SecretNotFound,
                    format!(
                        "Secret {:?} ({field}) does not exist in this namespace; create it or fix the name",
                        r.name
                    ),
                ),
                Some(s) => match secret_value(s, &r.key) {
                    None => problems.push(
                        Reason::InvalidSecret,
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
    headers
}

/// `spec.endpoint.clientCertSecretRef`: the PEM chain and key for mutual TLS.
fn client_identity(spec: &WebhookSubscriptionSpec, refs: &References, problems: &mut Problems) -> Option<Vec<u8>> {
    let r = spec.endpoint.client_cert_secret_ref.as_ref()?;
    let Some(s) = refs.secrets.get(&r.name) else {
        problems.push(
            Reason::SecretNotFound,
            format!(
                "Secret {:?} (spec.endpoint.clientCertSecretRef) does not exist in this namespace; create a kubernetes.io/tls Secret with tls.crt and tls.key",
                r.name
            ),
        );
        return None;
    };
    let missing: Vec<&str> = ["tls.crt", "tls.key"]
        .into_iter()
        .filter(|k| secret_value(s, k).is_none_or(|v| !v.contains("-----BEGIN")))
        .collect();
    if !missing.is_empty() {
        problems.push(
            Reason::InvalidSecret,
            format!(
                "Secret {:?} (spec.endpoint.clientCertSecretRef) lacks a PEM {}; it must hold tls.crt and tls.key",
                r.name,
                missing.join(" and ")
            ),
        );
        return None;
    }
    let (crt, key) = (secret_value(s, "tls.crt")?, secret_value(s, "tls.key")?);
    Some(format!("{}\n{}", crt.trim_end(), key).into_bytes())
}

/// `spec.endpoint.caBundle` must hold a PEM certificate; the client checks the rest.
fn ca_bundle(spec: &WebhookSubscriptionSpec, problems: &mut Problems) {
    if let Some(bundle) = &spec.endpoint.ca_bundle
        && !bundle.contains("-----BEGIN CERTIFICATE-----")
    {
        problems.push(
            Reason::InvalidEndpoint,
            "spec.endpoint.caBundle holds no PEM certificate (-----BEGIN CERTIFICATE-----); paste the CA's PEM text"
                .to_string(),
        );
    }
}

/// `spec.filterRefs` and `spec.filterSelector`: the names of the valid filters they
/// reach, sorted.
fn filters(spec: &WebhookSubscriptionSpec, refs: &References, problems: &mut Problems) -> Vec<String> {
    let mut filters = Vec::new();
    for name in &spec.filter_refs {
        match refs.filters.iter().find(|f| &f.name == name) {
            None => problems.push(
                Reason::FilterNotFound,
                format!(
                    "MailboxFilter {name:?} (spec.filterRefs) does not exist in this namespace; create it or remove the reference"
                ),
            ),
            Some(FilterRef { invalid: Some(e), .. }) => problems.push(
                Reason::InvalidFilter,
                format!("MailboxFilter {name:?} is invalid ({e}); fix the filter"),
            ),
            Some(_) => filters.push(name.clone()),
        }
    }
    if let Some(selector) = &spec.filter_selector {
        match Selector::try_from(selector.clone()) {
            Err(e) => problems.push(
                Reason::InvalidSpec,
                format!("spec.filterSelector is not a valid label selector: {e}"),
            ),
            Ok(selector) => {
                let selected: Vec<&FilterRef> = refs.filters.iter().filter(|f| selector.matches(&f.labels)).collect();
                if selected.is_empty() {
                    problems.push(
                        Reason::FilterNotFound,
                        "spec.filterSelector matches no MailboxFilter in this namespace; label a filter to match it or change the selector".to_string(),
                    );
                }
                for f in selected {
                    match &f.invalid {
                        None => filters.push(f.name.clone()),
                        Some(e) => problems.push(
                            Reason::InvalidFilter,
                            format!(
                                "MailboxFilter {:?} (selected by spec.filterSelector) is invalid ({e}); fix the filter",
                                f.name
                            ),
                        ),
                    }
                }
            }
        }
    }
    filters.sort();
    filters.dedup();
    filters
}

/// `spec.payload.redact` may not remove what tells events apart.
fn redactions(spec: &WebhookSubscriptionSpec, problems: &mut Problems) {
    for field in &spec.payload.redact {
        if crate::delivery::payload::UNREDACTABLE.contains(&field.as_str()) {
            problems.push(
                Reason::InvalidSpec,
                format!(
                    "spec.payload.redact cannot remove {field:?}: receivers need eventId, source and occurredAt to tell events apart; remove it from the list"
                ),
            );
        }
    }
}

/// `spec.payload.encryption`: the receiver's public keys.
fn encryption(spec: &WebhookSubscriptionSpec, refs: &References, problems: &mut Problems) -> Option<EncryptionKeys> {
    let name = &spec.payload.encryption.as_ref()?.public_key_secret_ref.name;
    let Some(secret) = refs.secrets.get(name) else {
        problems.push(
            Reason::SecretNotFound,
            format!(
                "Secret {name:?} (spec.payload.encryption.publicKeySecretRef) does not exist in this namespace; create it with the receiver's public JWK, e.g. `kubectl create secret generic {name} --from-file=2026-12.jwk=public.jwk`"
            ),
        );
        return None;
    };
    let data: std::collections::BTreeMap<String, Vec<u8>> = secret
        .data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    match EncryptionKeys::from_secret_data(&data) {
        Ok(keys) => Some(keys),
        Err(e) => {
            problems.push(
                Reason::InvalidSecret,
                format!("Secret {name:?} (spec.payload.encryption.publicKeySecretRef): {e}"),
            );
            None
        }
    }
}

/// `spec.delivery.batch`, whose wait must be shorter than `max_event_age` (when that
/// parsed).
fn batch(
    spec: &WebhookSubscriptionSpec,
    max_event_age: Option<Duration>,
    problems: &mut Problems,
) -> Option<BatchSettings> {
    let b = spec.delivery.batch.as_ref()?;
    let max_wait = match parse_duration(&b.max_wait) {
        Ok(d) => d,
        Err(e) => {
            problems.push(Reason::InvalidSpec, format!("spec.delivery.batch.maxWait: {e}"));
            return None;
        }
    };
    if max_event_age.is_some_and(|age| max_wait >= age) {
        problems.push(
            Reason::InvalidSpec,
            format!(
                "spec.delivery.batch.maxWait ({}) is not shorter than spec.delivery.maxEventAge ({}): events would expire waiting for their batch; shorten maxWait",
                b.max_wait, spec.delivery.max_event_age
            ),
        );
        return None;
    }
    Some(BatchSettings {
        max_events: b.max_events.clamp(1, 1000) as usize,
        max_bytes: b.max_bytes.max(1024) as usize,
        max_wait,
    })
}

/// `spec.delivery.deadLetterSink`: another subscription or a URL.
fn dead_letter_sink(spec: &WebhookSubscriptionSpec, problems: &mut Problems) -> Option<Sink> {
    let sink = spec.delivery.dead_letter_sink.as_ref()?;
    match (&sink.subscription_ref, &sink.uri) {
        (Some(r), None) => Some(Sink::Subscription(r.name.clone())),
        (None, Some(uri)) => match url::Url::parse(uri) {
            Ok(url) if url.host_str().is_some() && matches!(url.scheme(), "https" | "http") => Some(Sink::Uri(url)),
            _ => {
                problems.push(
                    Reason::InvalidSpec,
                    format!(
                        "spec.delivery.deadLetterSink.uri {uri:?} is not an absolute http(s) URL with a host; use one such as https://dlq.example.com/hooks"
                    ),
                );
                None
            }
        },
        _ => {
            problems.push(
                Reason::InvalidSpec,
                "spec.delivery.deadLetterSink needs exactly one of ref or uri".to_string(),
            );
            None
        }
    }
}

/// `spec.delivery.maxBacklog` as given: a figure left out (or refused) is None.
fn max_backlog(spec: &WebhookSubscriptionSpec, problems: &mut Problems) -> BacklogCap {
    let Some(m) = &spec.delivery.max_backlog else {
        return BacklogCap::default();
    };
    // The CRD refuses 0 and malformed quantities; an apiserver without its rules must
    // not turn them into a cap that dead-letters every event.
    if m.events == Some(0) {
        problems.push(
            Reason::InvalidSpec,
            "spec.delivery.maxBacklog.events must be at least 1; leave it out for the operator's default".to_string(),
        );
    }
    let bytes = m.bytes.as_deref().and_then(|text| match parse_bytes(text) {
        Ok(n) => Some(n),
        Err(e) => {
            problems.push(Reason::InvalidSpec, format!("spec.delivery.maxBacklog.bytes: {e}"));
            None
        }
    });
    BacklogCap {
        events: m.events.filter(|n| *n > 0),
        bytes,
    }
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

#[cfg(test)]
mod tests {
    use super::super::{Desired, Status, conditions, progress, ready_condition};
    use super::*;
    use crate::api::{
        Endpoint, EventType, MailboxFilter, MailboxFilterSpec, MatchCriteria, SecretRef, Signing, SubjectMatch,
    };
    use crate::controller::conditions::READY;
    use k8s_openapi::ByteString;

    #[test]
    fn reasons_on_the_wire() {
        use Reason::*;
        let wire = [
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
            NotGranted,
        ]
        .map(|r| r.as_str());
        assert_eq!(
            wire,
            [
                "Valid",
                "Paused",
                "SecretNotFound",
                "InvalidSecret",
                "FilterNotFound",
                "InvalidFilter",
                "InvalidEndpoint",
                "InvalidSpec",
                "EgressRefused",
                "EndpointNotVerified",
                "NotGranted",
            ]
        );
    }

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

    fn refs_with_signing(value: &str) -> References {
        References {
            secrets: [("signing".to_string(), secret(&[("key", value)]))].into(),
            ..Default::default()
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
    fn max_backlog_is_parsed_and_a_bad_one_names_the_field() {
        let v = validate(&spec(), &refs_with_signing(KEY)).expect("valid");
        assert_eq!(
            v.max_backlog,
            BacklogCap::default(),
            "absent: both figures from the default"
        );
        let mut s = spec();
        s.delivery.max_backlog = Some(crate::api::MaxBacklog {
            events: None,
            bytes: Some("2Gi".into()),
        });
        let v = validate(&s, &refs_with_signing(KEY)).expect("valid");
        assert_eq!(
            v.max_backlog,
            BacklogCap {
                events: None,
                bytes: Some(2 << 30)
            }
        );
        s.delivery.max_backlog = Some(crate::api::MaxBacklog {
            events: Some(0),
            bytes: Some("2GB".into()),
        });
        let problems = validate(&s, &refs_with_signing(KEY)).unwrap_err();
        let text: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        assert!(
            text.iter()
                .any(|m| m.starts_with("spec.delivery.maxBacklog.events must be at least 1")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|m| m.starts_with("spec.delivery.maxBacklog.bytes: \"2GB\" is not a quantity of bytes")),
            "{text:?}"
        );
        assert!(problems.iter().all(|p| p.reason == Reason::InvalidSpec));
    }

    #[test]
    fn receiver_settings_are_checked_naming_the_field_and_the_fix() {
        let mut s = spec();
        s.payload.redact = vec!["eventId".into()];
        s.payload.encryption = Some(crate::api::Encryption {
            public_key_secret_ref: SecretRef { name: "keys".into() },
        });
        s.delivery.batch = Some(crate::api::Batch {
            max_events: 10,
            max_bytes: 4096,
            max_wait: "100h".into(),
        });
        let problems = validate(&s, &refs_with_signing(KEY)).unwrap_err();
        let text: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        assert!(
            text.iter()
                .any(|m| m.contains("spec.payload.redact cannot remove \"eventId\"")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|m| m.contains("spec.payload.encryption.publicKeySecretRef") && m.contains("does not exist")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|m| m.contains("spec.delivery.batch.maxWait")),
            "{text:?}"
        );

        // A private key in the Secret is refused.
        let mut refs = refs_with_signing(KEY);
        refs.secrets.insert(
            "keys".into(),
            secret(&[("2026.jwk", r#"{"kty":"EC","crv":"P-256","x":"a","y":"b","d":"c"}"#)]),
        );
        let mut s = spec();
        s.payload.encryption = Some(crate::api::Encryption {
            public_key_secret_ref: SecretRef { name: "keys".into() },
        });
        let problems = validate(&s, &refs).unwrap_err();
        assert_eq!(problems[0].reason, Reason::InvalidSecret);
        assert!(problems[0].message.contains("private key"), "{}", problems[0].message);
    }

    #[test]
    fn missing_secret_says_how_to_create_it() {
        let problems = validate(&spec(), &References::default()).unwrap_err();
        assert_eq!(problems[0].reason, Reason::SecretNotFound);
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
            assert_eq!(problems[0].reason, Reason::InvalidSecret, "{value}");
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
        refs.filters = vec![FilterRef::compile(&good), FilterRef::compile(&bad)];
        let problems = validate(&s, &refs).unwrap_err();
        let reasons: Vec<_> = problems.iter().map(|p| p.reason).collect();
        assert_eq!(reasons, vec![Reason::FilterNotFound, Reason::InvalidFilter]);

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
            Reason::SecretNotFound,
            Reason::InvalidSecret,
            Reason::FilterNotFound,
            Reason::InvalidFilter,
            Reason::InvalidEndpoint,
            Reason::InvalidSpec,
            Reason::EgressRefused,
        ] {
            assert_eq!(kind(stalled), Some(conditions::STALLED), "{stalled:?}");
        }
        assert_eq!(kind(Reason::Paused), None);
        assert_eq!(kind(Reason::EndpointNotVerified), Some(conditions::RECONCILING));
    }

    #[test]
    fn ready_reports_first_reason_and_paused() {
        let ready = ready_condition(&spec(), &validate(&spec(), &References::default()));
        assert_eq!((ready.status, ready.reason), (Status::False, Reason::SecretNotFound));

        let mut paused = spec();
        paused.paused = true;
        let ready = ready_condition(&paused, &validate(&paused, &refs_with_signing(KEY)));
        assert_eq!((ready.status, ready.reason), (Status::False, Reason::Paused));
        let ready = ready_condition(&spec(), &validate(&spec(), &refs_with_signing(KEY)));
        assert_eq!((ready.status, ready.reason), (Status::True, Reason::Valid));
    }

    fn grant(name: &str, mode: crate::api::PayloadMode, raw: bool) -> std::sync::Arc<crate::route::CompiledGrant> {
        let spec = crate::api::MailboxGrantSpec {
            mailboxes: vec!["*".into()],
            max_payload_mode: mode,
            raw_message_links: raw,
            ..Default::default()
        };
        std::sync::Arc::new(crate::route::CompiledGrant::compile(name, &spec).expect("compiles"))
    }

    #[test]
    fn authorize_names_the_field_that_asks_too_much() {
        use crate::api::PayloadMode;
        let none = authorize(&spec(), "team", &[]).expect_err("no grant");
        assert_eq!(none.reason, Reason::NotGranted);
        assert!(
            none.message.contains("No MailboxGrant covers namespace team"),
            "{}",
            none.message
        );

        let metadata = [grant("all", PayloadMode::Metadata, false)];
        let full = authorize(&spec(), "team", &metadata).expect_err("full asked");
        assert!(
            full.message
                .starts_with("spec.payload.mode: full is fuller than the MailboxGrants of namespace team (all)"),
            "{}",
            full.message
        );
        let mut asks_metadata = spec();
        asks_metadata.payload.mode = PayloadMode::Metadata;
        assert_eq!(
            authorize(&asks_metadata, "team", &metadata),
            Ok(vec!["all".to_string()])
        );

        let both = [
            grant("all", PayloadMode::Metadata, false),
            grant("finance", PayloadMode::Full, false),
        ];
        assert_eq!(
            authorize(&spec(), "team", &both),
            Ok(vec!["all".to_string(), "finance".to_string()]),
            "one grant allowing full is enough: each event is capped by its own grants"
        );
        let mut raw = spec();
        raw.payload.include_raw_message_link = true;
        let refused = authorize(&raw, "team", &both).expect_err("no raw links granted");
        assert!(
            refused.message.starts_with("spec.payload.includeRawMessageLink"),
            "{}",
            refused.message
        );
        assert!(authorize(&raw, "team", &[grant("raw", PayloadMode::Full, true)]).is_ok());

        // A grant of other event types gives this subscription nothing: not listed, and
        // alone it is refused naming spec.eventTypes.
        let flags_only = {
            let spec = crate::api::MailboxGrantSpec {
                mailboxes: vec!["*".into()],
                event_types: vec![crate::api::EventType::ComplianceFlagged],
                max_payload_mode: PayloadMode::Full,
                ..Default::default()
            };
            std::sync::Arc::new(crate::route::CompiledGrant::compile("flags", &spec).expect("compiles"))
        };
        let received = spec(); // asks for message.received
        let refused = authorize(&received, "team", std::slice::from_ref(&flags_only)).expect_err("other types");
        assert!(refused.message.starts_with("spec.eventTypes:"), "{}", refused.message);
        assert_eq!(
            authorize(
                &received,
                "team",
                &[flags_only, grant("finance", PayloadMode::Full, false)]
            ),
            Ok(vec!["finance".to_string()])
        );
    }
}
