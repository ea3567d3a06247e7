//! `MailboxGrant`: the cluster-scoped resource with which a cluster admin hands a slice of
//! the organisation's mail to namespaces. Without one, a namespace receives nothing.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::EventType;
use super::webhook_subscription::PayloadMode;

/// Lets the WebhookSubscriptions and MailboxFilters of some namespaces see the events of
/// some mailboxes. Mail belongs to the organisation: a namespace sees only what a grant
/// gives it, and several grants add up. Only cluster admins should be able to create these.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailhook.io",
    version = "v1alpha1",
    kind = "MailboxGrant",
    shortname = "mbg",
    category = "mailhook",
    status = "MailboxGrantStatus",
    printcolumn = r#"{"name":"Namespaces","type":"string","jsonPath":".status.namespaceSummary"}"#,
    printcolumn = r#"{"name":"Mailboxes","type":"string","jsonPath":".status.mailboxSummary"}"#,
    printcolumn = r#"{"name":"Max Payload","type":"string","jsonPath":".spec.maxPayloadMode"}"#,
    printcolumn = r#"{"name":"Subscriptions","type":"integer","jsonPath":".status.subscriptions"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.namespaces) && size(self.namespaces) > 0) || has(self.namespaceSelector)").message("a grant needs spec.namespaces or spec.namespaceSelector: which namespaces it is for"))]
#[x_kube(validation = Rule::new("(has(self.mailboxes) && size(self.mailboxes) > 0) || (has(self.domains) && size(self.domains) > 0)").message("a grant needs spec.mailboxes or spec.domains: which mail it gives (use mailboxes: [\"*\"] for all of it)"))]
#[x_kube(validation = Rule::new("!has(self.rawMessageLinks) || !self.rawMessageLinks || (has(self.maxPayloadMode) && self.maxPayloadMode == 'full')").message("spec.rawMessageLinks needs spec.maxPayloadMode: full (a raw message shows everything the other modes hide)"))]
pub struct MailboxGrantSpec {
    /// Names of the namespaces this grant is for.
    #[serde(default)]
    #[schemars(length(max = 256), inner(length(min = 1, max = 63)))]
    pub namespaces: Vec<String>,

    /// Namespaces this grant is for, by label (in addition to `namespaces`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// Globs over the mailbox an event belongs to, e.g. `*@finance.example.com`; `*`
    /// matches any run of characters, `?` one; case is ignored. `["*"]` grants every
    /// mailbox.
    #[serde(default)]
    #[schemars(length(max = 256), inner(length(min = 1, max = 320)))]
    pub mailboxes: Vec<String>,

    /// Mailbox domains granted whole, e.g. `finance.example.com` (subdomains included).
    #[serde(default)]
    #[schemars(length(max = 256), inner(length(min = 1, max = 253)))]
    pub domains: Vec<String>,

    /// Event types granted; empty grants every type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub event_types: Vec<EventType>,

    /// The fullest payload the granted events may be delivered with: `full` (subjects and
    /// addresses), `anonymized` (addresses as pseudonyms) or `metadata` (domains, sizes and
    /// types only). Default `metadata`. Applies per event: an event covered by several
    /// grants of a namespace goes out at the fullest of their ceilings.
    #[serde(default = "default_max_payload_mode")]
    pub max_payload_mode: PayloadMode,

    /// Whether subscriptions may carry links to the archived raw message
    /// (`payload.includeRawMessageLink`) for the granted events. Needs `maxPayloadMode:
    /// full`. Default false.
    #[serde(default)]
    pub raw_message_links: bool,
}

fn default_max_payload_mode() -> PayloadMode {
    PayloadMode::Metadata
}

impl Default for MailboxGrantSpec {
    fn default() -> Self {
        MailboxGrantSpec {
            namespaces: Vec::new(),
            namespace_selector: None,
            mailboxes: Vec::new(),
            domains: Vec::new(),
            event_types: Vec::new(),
            max_payload_mode: default_max_payload_mode(),
            raw_message_links: false,
        }
    }
}

/// What the operator last observed about a MailboxGrant.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MailboxGrantStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`: the grant is valid and routing applies it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// The namespaces the grant covers now (names and selector), sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub covered_namespaces: Vec<String>,

    /// The covered namespaces for display, e.g. `finance,audit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_summary: Option<String>,

    /// The granted mailboxes and domains for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mailbox_summary: Option<String>,

    /// WebhookSubscriptions that receive events through this grant.
    #[serde(default)]
    pub subscriptions: u32,

    /// The audit log index of the act of custody that recorded the grant as it is now
    /// (created, or last changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_index: Option<u64>,

    /// The `metadata.generation` that `logIndex` recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logged_generation: Option<i64>,
}

impl PayloadMode {
    /// How much a mode shows: metadata < anonymized < full.
    pub fn rank(self) -> u8 {
        match self {
            PayloadMode::Metadata => 0,
            PayloadMode::Anonymized => 1,
            PayloadMode::Full => 2,
        }
    }

    /// The less revealing of two modes.
    pub fn at_most(self, ceiling: PayloadMode) -> PayloadMode {
        if self.rank() <= ceiling.rank() { self } else { ceiling }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PayloadMode::Full => "full",
            PayloadMode::Metadata => "metadata",
            PayloadMode::Anonymized => "anonymized",
        }
    }
}
