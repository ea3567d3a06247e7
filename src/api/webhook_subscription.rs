//! `WebhookSubscription`: one endpoint and the events it receives.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{EventType, SecretKeyRef, SecretRef};

/// A Go-style duration such as `5s`, `1m30s` or `2h`: CEL that accepts it when positive.
pub(super) const POSITIVE_DURATION: &str =
    "self.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') && duration(self) > duration('0s')";
/// Every entry a duration, zero allowed (`0s` means "immediately" in a retry schedule).
const DURATION_LIST: &str = "self.all(d, d.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$'))";
/// `maxBacklog.bytes`: a positive quantity (`super::QUANTITY_PATTERN`, not zero).
const BACKLOG_BYTES: &str = "!has(self.bytes) || (self.bytes.matches('^[0-9]+(\\\\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$') && !self.bytes.matches('^[0.]+[a-zA-Z]*$'))";

/// Delivers every mailbox event that matches to one HTTPS endpoint, signed with the
/// Standard Webhooks scheme, retried on a schedule until it is accepted.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailhook.io",
    version = "v1alpha1",
    kind = "WebhookSubscription",
    namespaced,
    shortname = "whs",
    category = "mailhook",
    status = "WebhookSubscriptionStatus",
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.endpointHost"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Healthy","type":"string","jsonPath":".status.conditions[?(@.type==\"Healthy\")].status"}"#,
    printcolumn = r#"{"name":"Stalled","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Stalled\")].status"}"#,
    printcolumn = r#"{"name":"Backlog","type":"integer","jsonPath":".status.backlog"}"#,
    printcolumn = r#"{"name":"Delivered","type":"integer","jsonPath":".status.delivered"}"#,
    printcolumn = r#"{"name":"Last Success","type":"date","jsonPath":".status.lastSuccessTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.eventTypes) && size(self.eventTypes) > 0) || (has(self.filterRefs) && size(self.filterRefs) > 0) || has(self.filterSelector)").message("a subscription needs at least one of eventTypes, filterRefs or filterSelector, otherwise it would receive nothing"))]
#[x_kube(validation = Rule::new("!has(self.delivery) || !has(self.delivery.deadLetterSink) || !has(self.delivery.deadLetterSink.uri) || self.delivery.deadLetterSink.uri.startsWith('https://') || (has(self.endpoint.allowInsecureHttp) && self.endpoint.allowInsecureHttp)").message("delivery.deadLetterSink.uri must start with https:// (plain http:// needs endpoint.allowInsecureHttp: true)"))]
pub struct WebhookSubscriptionSpec {
    /// Where deliveries go and how to connect.
    pub endpoint: Endpoint,

    /// How deliveries are signed.
    pub signing: Signing,

    /// Event types to deliver. Combined with filters, an event must have one of these
    /// types and match a filter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub event_types: Vec<EventType>,

    /// Names of MailboxFilters in this namespace; an event matching any of them is
    /// delivered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub filter_refs: Vec<String>,

    /// Selects MailboxFilters in this namespace by label, in addition to filterRefs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_selector: Option<LabelSelector>,

    /// What each delivery carries.
    #[serde(default)]
    pub payload: Payload,

    /// Retries, limits and ordering.
    #[serde(default)]
    pub delivery: Delivery,

    /// Stops deliveries while true; events keep queueing (subject to maxEventAge) and
    /// are delivered once unpaused.
    #[serde(default)]
    pub paused: bool,
}

/// The receiving endpoint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.url.startsWith('https://') || (self.allowInsecureHttp && self.url.startsWith('http://'))").message("endpoint.url must start with https:// (plain http:// needs endpoint.allowInsecureHttp: true)"))]
pub struct Endpoint {
    /// Absolute URL deliveries are POSTed to, e.g. `https://siem.example.com/hooks/mail`.
    #[schemars(length(min = 8, max = 2048))]
    pub url: String,

    /// Allows a plain `http://` URL. Deliveries then cross the network unencrypted;
    /// use only inside a trusted network.
    #[serde(default)]
    pub allow_insecure_http: bool,

    /// How long to wait for the endpoint's answer before counting the attempt as failed,
    /// as a duration such as `10s`.
    #[serde(default = "default_timeout")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(POSITIVE_DURATION).message("endpoint.timeout must be a positive duration such as 10s or 1m30s"))]
    pub timeout: String,

    /// Extra HTTP headers sent with every delivery (for example an API key the receiver
    /// expects). The Standard Webhooks headers cannot be overridden.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub headers: Vec<EndpointHeader>,

    /// PEM-encoded CA certificates trusted for this endpoint, in addition to the
    /// system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub ca_bundle: Option<String>,

    /// A Secret of type `kubernetes.io/tls` (keys `tls.crt`, `tls.key`) presented as the
    /// client certificate, for endpoints that require mutual TLS. A change to the Secret
    /// (a renewed certificate) is picked up without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<SecretRef>,

    /// Before delivering, require the endpoint to echo a challenge: mailhook POSTs a signed
    /// `endpoint.verification` event and the endpoint answers `{"challenge": <data.challenge>}`.
    /// Until it does, Ready is False (EndpointNotVerified) and events queue.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub verify: bool,

    /// DANGER: accept any server certificate, so anyone on the network path can read and
    /// alter deliveries. For a test endpoint only; prefer caBundle. Shown on status and
    /// in the Ready message while set.
    #[serde(
        default,
        rename = "insecureSkipTLSVerify",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub insecure_skip_tls_verify: bool,
}

fn default_timeout() -> String {
    "10s".to_string()
}

/// One extra HTTP header. Give either `value` or `valueFrom`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.value) != has(self.valueFrom)").message("a header needs exactly one of value or valueFrom"))]
pub struct EndpointHeader {
    /// Header name, e.g. `X-Api-Key`.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))]
    pub name: String,

    /// A literal value. Prefer valueFrom for anything secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub value: Option<String>,

    /// Takes the value from a key of a Secret in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<SecretKeyRef>,
}

/// How deliveries are signed (Standard Webhooks).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Signing {
    /// A Secret in this namespace whose every data value is a signing secret of the form
    /// `whsec_<base64>`. During rotation put the old and new secrets under two keys: each
    /// delivery then carries a signature from every one, so receivers can roll over.
    pub secret_ref: SecretRef,
}

/// How much of an event a delivery carries.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PayloadMode {
    /// Every field, including subject and addresses.
    #[default]
    Full,
    /// Domains, counts, sizes and types: no address, subject, Message-ID, attachment name
    /// or producer id.
    Metadata,
    /// Every address replaced by a stable keyed pseudonym; no subject, Message-ID,
    /// attachment name or producer id.
    Anonymized,
}

/// What each delivery carries.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.includeRawMessageLink) || !self.includeRawMessageLink || !has(self.mode) || self.mode == 'full'").message("payload.includeRawMessageLink needs payload.mode full: the raw message shows everything the metadata and anonymized modes hide"))]
pub struct Payload {
    /// `full` (default), `metadata` or `anonymized`. The namespace's MailboxGrants set the
    /// fullest mode allowed (`maxPayloadMode`); an event is never sent fuller than the
    /// grant that covers its mailbox allows.
    #[serde(default)]
    pub mode: PayloadMode,

    /// Fields of `data` removed from every delivery, e.g. `subject`, `cc`,
    /// `attachments`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 64)))]
    pub redact: Vec<String>,

    /// Adds `data.rawMessage` (a time-limited signed URL to the archived raw message,
    /// its SHA-256 and size) to events made from journaled mail. Needs mode `full` and a
    /// MailboxGrant with `rawMessageLinks: true`; the operator keeps raw messages only for
    /// subscriptions that set this.
    #[serde(default)]
    pub include_raw_message_link: bool,

    /// `standardWebhooks` (default): `{"type", "timestamp", "data"}` as the body.
    /// `cloudEvents`: a CloudEvents 1.0 event (`io.mailhook.<type>`); the Standard Webhooks
    /// signature headers are sent with either.
    #[serde(default, skip_serializing_if = "is_default")]
    pub format: PayloadFormat,

    /// CloudEvents settings, used with `format: cloudEvents`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_events: Option<CloudEventsSettings>,

    /// Encrypts every delivery to the receiver's public key (JWE, ECDH-ES+A256KW with
    /// A256GCM), so that nothing between mailhook and the receiver can read the mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// The shape of a delivery.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PayloadFormat {
    /// Standard Webhooks JSON: `{"type", "timestamp", "data"}`.
    #[default]
    StandardWebhooks,
    /// CloudEvents 1.0 over HTTP (binary or structured content mode).
    CloudEvents,
}

/// How CloudEvents travel over HTTP.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CloudEventsMode {
    /// Attributes as `ce-` headers, the body is the event's data (Knative's default).
    #[default]
    Binary,
    /// The whole event as `application/cloudevents+json`.
    Structured,
}

/// CloudEvents settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CloudEventsSettings {
    /// `binary` (default) or `structured`. Batched deliveries always use the batched
    /// content mode (`application/cloudevents-batch+json`).
    #[serde(default)]
    pub mode: CloudEventsMode,
}

/// Payload encryption to the receiver's public key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Encryption {
    /// A Secret in this namespace whose every data value is a public JWK (EC P-256) or a
    /// JWK Set. The value whose key name sorts last is the newest and encrypts: name keys
    /// by date (`2026-12.jwk`) to rotate. Never put the private key here.
    pub public_key_secret_ref: SecretRef,
}

/// Whether deliveries to one endpoint keep the order of events.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Ordering {
    /// No ordering: deliveries run concurrently up to `concurrency`.
    #[default]
    None,
    /// Events of one mailbox are delivered one at a time, in order; a failing event
    /// holds back the later events of its mailbox.
    PerMailbox,
}

/// Retries, limits and ordering.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// Delays before each attempt, counted from the previous failure; the first entry
    /// is the first attempt (`0s` = immediately). Each delay is the longest wait: the
    /// actual one is drawn uniformly below it (full jitter), so endpoints failing together
    /// are not retried in lock-step. An event is dead-lettered once every entry is used
    /// up. Default: 0s, 5s, 5m, 30m, 2h, 5h, 10h, 10h.
    #[serde(default = "default_retry_schedule")]
    #[schemars(length(min = 1, max = 32), inner(length(max = 32)))]
    #[x_kube(validation = Rule::new(DURATION_LIST).message("every delivery.retrySchedule entry must be a duration such as 0s, 5s, 5m or 2h"))]
    pub retry_schedule: Vec<String>,

    /// Events older than this are not attempted again and go to the dead letters.
    #[serde(default = "default_max_event_age")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(POSITIVE_DURATION).message("delivery.maxEventAge must be a positive duration such as 72h"))]
    pub max_event_age: String,

    /// Longest `Retry-After` honoured: an endpoint answering 429/502/503/504 with a longer
    /// one is retried after this instead, so a broken or hostile endpoint cannot park
    /// deliveries for days. Default 1h.
    #[serde(default = "default_max_retry_after")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(POSITIVE_DURATION).message("delivery.maxRetryAfter must be a positive duration such as 1h"))]
    pub max_retry_after: String,

    /// Most requests per second sent to this endpoint; absent means no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub rate_limit_per_second: Option<u32>,

    /// Most deliveries in flight to this endpoint at once.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 256))]
    pub concurrency: u32,

    /// `none` (default) or `perMailbox`.
    #[serde(default)]
    pub ordering: Ordering,

    /// How long dead-lettered events are kept for replay.
    #[serde(default = "default_dead_letter_retention")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(POSITIVE_DURATION).message("delivery.deadLetterRetention must be a positive duration such as 168h"))]
    pub dead_letter_retention: String,

    /// Where each dead-lettered event is sent as well, with why it died: another
    /// WebhookSubscription in this namespace (`ref`) or an endpoint (`uri`, signed and
    /// connected like this subscription's). Dead letters are still kept for replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_sink: Option<DeadLetterSink>,

    /// Sends several events per request (a JSON array, or a CloudEvents batch), for
    /// collectors that ingest in bulk. A batch succeeds or is retried whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<Batch>,

    /// After failing without a single success for this long, the endpoint is disabled
    /// (Healthy=False, reason EndpointDisabled) until the subscription is edited or
    /// replayed.
    #[serde(default = "default_disable_after")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(POSITIVE_DURATION).message("delivery.disableAfter must be a positive duration such as 120h"))]
    pub disable_after: String,

    /// The most this subscription's backlog (events waiting or in flight) may hold. Once
    /// it is full, new events for this subscription go straight to its dead letters
    /// (reason naming delivery.maxBacklog) instead of waiting; ingest never refuses mail
    /// for it, and other subscriptions are not affected. Each figure left out takes the
    /// operator's default (`--default-max-backlog-events`, `--default-max-backlog-bytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backlog: Option<MaxBacklog>,
}

/// A cap on one subscription's backlog; a figure left out takes the operator's default.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(BACKLOG_BYTES).message("delivery.maxBacklog.bytes must be a positive quantity of bytes such as 512Mi, 2Gi or 500M (suffixes Ki, Mi, Gi, Ti, k, M, G, T)"))]
pub struct MaxBacklog {
    /// Most events waiting or in flight, at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub events: Option<u64>,

    /// Most bytes of events waiting or in flight, as a quantity such as `512Mi` or `2Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub bytes: Option<String>,
}

/// Where dead-lettered events go. Give exactly one of `ref` or `uri`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.ref) != has(self.uri)").message("delivery.deadLetterSink needs exactly one of ref or uri"))]
#[x_kube(validation = Rule::new("!has(self.uri) || self.uri.startsWith('https://') || self.uri.startsWith('http://')").message("delivery.deadLetterSink.uri must be an http:// or https:// URL (plain http:// also needs endpoint.allowInsecureHttp: true)"))]
pub struct DeadLetterSink {
    /// Another WebhookSubscription in this namespace; its endpoint, signing, format and
    /// encryption are used.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub subscription_ref: Option<SubscriptionRef>,
    /// An endpoint, reached with this subscription's signing, TLS and payload settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 8, max = 2048))]
    pub uri: Option<String>,
}

/// Names a WebhookSubscription in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionRef {
    /// The WebhookSubscription's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Several events per request.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Batch {
    /// Most events in one request.
    #[schemars(range(min = 1, max = 1000))]
    pub max_events: u32,
    /// Most bytes of events in one request (before encryption); one event larger than
    /// this is sent alone. Default 1 MiB.
    #[serde(default = "default_batch_bytes")]
    #[schemars(range(min = 1024, max = 16777216))]
    pub max_bytes: u32,
    /// Longest an event waits for others to fill its batch. Default 1s.
    #[serde(default = "default_batch_wait")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(POSITIVE_DURATION).message("delivery.batch.maxWait must be a positive duration such as 1s or 500ms"))]
    pub max_wait: String,
}

fn default_batch_bytes() -> u32 {
    1024 * 1024
}
fn default_batch_wait() -> String {
    "1s".to_string()
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            retry_schedule: default_retry_schedule(),
            max_event_age: default_max_event_age(),
            max_retry_after: default_max_retry_after(),
            rate_limit_per_second: None,
            concurrency: default_concurrency(),
            ordering: Ordering::None,
            dead_letter_retention: default_dead_letter_retention(),
            dead_letter_sink: None,
            batch: None,
            disable_after: default_disable_after(),
            max_backlog: None,
        }
    }
}

fn default_retry_schedule() -> Vec<String> {
    ["0s", "5s", "5m", "30m", "2h", "5h", "10h", "10h"]
        .into_iter()
        .map(String::from)
        .collect()
}
fn default_max_event_age() -> String {
    "72h".to_string()
}
fn default_max_retry_after() -> String {
    "1h".to_string()
}
fn default_concurrency() -> u32 {
    4
}
fn default_dead_letter_retention() -> String {
    "168h".to_string()
}
fn default_disable_after() -> String {
    "120h".to_string()
}

/// The most recent failed delivery attempt.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryFailure {
    /// When the attempt failed.
    pub time: Time,
    /// HTTP status the endpoint answered, when it answered at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// Transport error (connection refused, TLS, timeout) or a short summary.
    pub message: String,
}

/// Annotation whose every new value asks the operator to replay the subscription's dead
/// letters once (`kubectl annotate --overwrite webhooksubscription/NAME
/// mailhook.io/replay-requested-at="$(date -u +%FT%TZ)"`).
pub const REPLAY_REQUESTED_AT: &str = "mailhook.io/replay-requested-at";
/// Optional bound on that replay: only dead letters given up since this time (RFC 3339)
/// or within this duration (`2h`).
pub const REPLAY_SINCE: &str = "mailhook.io/replay-since";

/// The outcome of the last replay requested with the `mailhook.io/replay-requested-at`
/// annotation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplayStatus {
    /// The annotation value this replay answered; a new value requests another replay.
    pub requested_at: String,
    /// When the operator handled the request.
    pub handled_at: Time,
    /// Dead letters queued again for delivery.
    pub replayed: u64,
    /// Only dead letters given up at or after this time were replayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// What happened, for a person.
    pub message: String,
}

/// What the operator last observed about a WebhookSubscription.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSubscriptionStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`: the configuration is valid and routed. `Healthy`: the endpoint accepts
    /// deliveries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// Host (and port) of the endpoint, for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_host: Option<String>,

    /// Public keys (`whpk_…`) of the ed25519 signing keys: receivers verify `v1a`
    /// signatures with these, without holding any secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signing_public_keys: Vec<String>,

    /// With `payload.encryption`: the id (`kid`) of the public key deliveries are
    /// encrypted to now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key_id: Option<String>,

    /// True while `endpoint.insecureSkipTLSVerify` turns certificate checks off.
    #[serde(
        default,
        rename = "insecureSkipTLSVerify",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub insecure_skip_tls_verify: bool,

    /// The MailboxGrants this subscription receives events through.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<String>,

    /// The delivery shard that owns this subscription.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<u32>,

    /// With several replicas on a shared store: the replica (pod) that delivers this
    /// subscription's shard, as it last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_owner: Option<String>,

    /// Events delivered (accepted with a 2xx).
    #[serde(default)]
    pub delivered: u64,

    /// Delivery attempts that failed.
    #[serde(default)]
    pub failed_attempts: u64,

    /// Events waiting to be delivered.
    #[serde(default)]
    pub backlog: u64,

    /// Bytes of the events waiting to be delivered (what delivery.maxBacklog.bytes caps).
    #[serde(default)]
    pub backlog_bytes: u64,

    /// When the oldest event still waiting was accepted; absent while nothing waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending_time: Option<Time>,

    /// Events that exhausted their retries, expired, or found the backlog full
    /// (delivery.maxBacklog), kept for replay.
    #[serde(default)]
    pub dead_lettered: u64,

    /// Failed attempts since the last success.
    #[serde(default)]
    pub consecutive_failures: u32,

    /// When a delivery last succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_time: Option<Time>,

    /// The most recent failed attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<DeliveryFailure>,

    /// Median latency of recent successful deliveries, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recent_latency_ms: Option<u64>,

    /// The last dead-letter replay requested through the annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_replay: Option<ReplayStatus>,
}
