//! `MailboxFilter`: a reusable, named selection of mailbox events.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{Direction, EventType};

/// A reusable selection of mailbox events. Every criterion given must hold (AND); within
/// one list any entry may match (OR); `exclude` removes what it matches. A filter with
/// `flag` also marks matched messages, which then produce a `compliance.flagged` event.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "mailhook.io",
    version = "v1alpha1",
    kind = "MailboxFilter",
    namespaced,
    shortname = "mbf",
    category = "mailhook",
    status = "MailboxFilterStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Stalled","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Stalled\")].status"}"#,
    printcolumn = r#"{"name":"Matched","type":"integer","jsonPath":".status.matchedMessages"}"#,
    printcolumn = r#"{"name":"Flag","type":"string","jsonPath":".spec.flag.name"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MailboxFilterSpec {
    /// What an event must look like to match.
    #[serde(flatten)]
    pub criteria: MatchCriteria,

    /// Events that match these criteria are removed from the selection, even when they
    /// match everything above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude: Option<MatchCriteria>,

    /// Marks every matched message for compliance review: subscriptions that ask for
    /// `compliance.flagged` receive one such event per flagged message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag: Option<ComplianceFlag>,
}

/// Criteria for selecting events. Every criterion given must hold; within a list any
/// entry may match. Address and domain comparisons ignore case.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MatchCriteria {
    /// Event types to select, e.g. `message.received`. Empty selects every type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub event_types: Vec<EventType>,

    /// Globs over the mailbox the event belongs to, e.g. `*@finance.example.com`.
    /// `*` matches any run of characters, `?` one character.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 320)))]
    pub mailboxes: Vec<String>,

    /// Globs over the sender address (`From`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 320)))]
    pub senders: Vec<String>,

    /// Globs over recipient addresses (To, Cc and Bcc); any recipient may match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 320)))]
    pub recipients: Vec<String>,

    /// Domains of the sender or any recipient, e.g. `example.com`. A domain also
    /// matches its subdomains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 253)))]
    pub domains: Vec<String>,

    /// Directions to select: `inbound`, `outbound`, `internal`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    pub directions: Vec<Direction>,

    /// Conditions on the subject line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<SubjectMatch>,

    /// Conditions on attachments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachments: Option<AttachmentMatch>,

    /// Bounds on the message size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<SizeRange>,

    /// Conditions on message headers; every entry must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub headers: Vec<HeaderMatch>,

    /// Globs over the folder an event concerns, ignoring case, e.g. `Trash` or
    /// `Projects/*`. A move matches by its destination or its source folder, a rename by
    /// the new or the old name. Events without a folder never match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 1024)))]
    pub folders: Vec<String>,

    /// `true` selects only what was done in an administrator's or master user's session
    /// (someone other than the mailbox's owner logged in); `false` only what the owner did.
    /// Events that carry no session (journaled or ingested mail) match neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_session: Option<bool>,

    /// Selects Sieve changes by where the active script sends mail: `external` when it
    /// redirects, answers (`vacation :from`) or notifies outside `--internal-domains`, or
    /// to a target it does not name (a variable, an included script, a pipe); `any` when it
    /// sends mail anywhere. Other events never match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarding: Option<ForwardingMatch>,

    /// Selects ACL changes: `granted` when someone may now do something they could not,
    /// `readGranted` when someone may now read the folder's mail. Other events never match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acl: Option<AclMatch>,

    /// `true` selects only what mailhook's own sessions did (its reconciler logs in as a
    /// master user), `false` leaves them out. Not given: a filter leaves them out (they
    /// stay labelled `activity.mailhookSession` for subscriptions without filters), so set
    /// `true` to audit mailhook's own access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mailhook_sessions: Option<bool>,
}

/// Which Sieve changes `forwarding` selects.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ForwardingMatch {
    /// The script sends mail outside the organisation, or to a target it does not name.
    External,
    /// The script sends mail anywhere.
    Any,
}

/// Which ACL changes `acl` selects.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AclMatch {
    /// Rights were added or set on an entry that grants.
    Granted,
    /// The read right was granted.
    ReadGranted,
}

/// Conditions on the subject line. When both are given, either may match.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SubjectMatch {
    /// Words or phrases that select the message when the subject contains any of them,
    /// ignoring case.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 256)))]
    pub keywords: Vec<String>,

    /// A regular expression (RE2-like syntax, no look-around) the subject must match
    /// somewhere. Prefix with `(?i)` to ignore case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub regex: Option<String>,
}

/// Conditions on attachments. Every condition given must hold.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentMatch {
    /// `true` selects messages with at least one attachment, `false` those with none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,

    /// Content types of which at least one attachment must be, e.g. `application/pdf`
    /// or `image/*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 255)))]
    pub content_types: Vec<String>,

    /// File extensions of which at least one attachment must have, without the dot,
    /// ignoring case, e.g. `pdf`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 32)))]
    pub extensions: Vec<String>,
}

/// Inclusive bounds on the message size in bytes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.minBytes) || !has(self.maxBytes) || self.minBytes <= self.maxBytes").message("size.minBytes must not be greater than size.maxBytes"))]
pub struct SizeRange {
    /// Smallest size selected, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_bytes: Option<u64>,

    /// Largest size selected, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_bytes: Option<u64>,
}

/// A condition on one message header.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.value) && has(self.regex))").message("a header match takes value or regex, not both"))]
pub struct HeaderMatch {
    /// Header name, ignoring case, e.g. `X-Priority`.
    #[schemars(length(min = 1, max = 128))]
    pub name: String,

    /// A glob the header's value must match, ignoring case. With neither value nor
    /// regex, the header only has to be present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub value: Option<String>,

    /// A regular expression the header's value must match somewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub regex: Option<String>,
}

/// How serious a compliance flag is; receivers use it to triage.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Severity {
    Low,
    #[default]
    Medium,
    High,
    Critical,
}

/// A compliance marking for matched messages.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ComplianceFlag {
    /// Name of the flag, carried in `compliance.flagged` events, e.g. `external-pdf`.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$"))]
    pub name: String,

    /// Severity: `low`, `medium` (default), `high` or `critical`.
    #[serde(default)]
    pub severity: Severity,
}

/// What the operator last observed about a MailboxFilter.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MailboxFilterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Current state. `Ready` is True when every pattern compiled and the filter is in
    /// the routing table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// Messages this filter has matched since the operator started counting.
    #[serde(default)]
    pub matched_messages: u64,

    /// When this filter last matched a message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_match_time: Option<Time>,

    /// WebhookSubscriptions in this namespace that use this filter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<String>,
}
