//! `LegalHold`: the cluster-scoped resource with which legal or compliance staff keep a
//! set of mailboxes' records past every retention setting, until the hold is released.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// The finalizer the operator puts on every hold: deleting a hold that keeps records is
/// refused (the object stays, marked for deletion) until `CONFIRM_RELEASE` confirms it.
pub const HOLD_FINALIZER: &str = "mailhook.io/legal-hold";

/// The annotation that confirms the release of a hold that keeps records: its value must
/// be the hold's name.
pub const CONFIRM_RELEASE: &str = "mailhook.io/confirm-release";

/// Keeps the archived raw messages, delivery attempts and dead letters of some mailboxes
/// past every retention setting until the hold is deleted, and archives those mailboxes'
/// raw messages from the moment it exists, whether or not a subscription asks for them.
/// Placing, changing and releasing a hold are written to the audit log.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "mailhook.io",
    version = "v1alpha1",
    kind = "LegalHold",
    shortname = "lh",
    category = "mailhook",
    status = "LegalHoldStatus",
    printcolumn = r#"{"name":"Mailboxes","type":"string","jsonPath":".status.mailboxSummary"}"#,
    printcolumn = r#"{"name":"Messages","type":"integer","jsonPath":".status.held.rawMessages"}"#,
    printcolumn = r#"{"name":"Attempts","type":"integer","jsonPath":".status.held.attempts"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.mailboxes) && size(self.mailboxes) > 0) || (has(self.domains) && size(self.domains) > 0)").message("a hold needs spec.mailboxes or spec.domains: which mail it keeps"))]
#[x_kube(validation = Rule::new("!has(self.from) || !has(self.until) || timestamp(self.from) < timestamp(self.until)").message("spec.from must be before spec.until"))]
pub struct LegalHoldSpec {
    /// Globs over the mailbox a record belongs to, e.g. `alice@example.com` or
    /// `*@legal.example.com`; `*` matches any run of characters, `?` one; case is ignored.
    #[serde(default)]
    #[schemars(length(max = 256), inner(length(min = 1, max = 320)))]
    pub mailboxes: Vec<String>,

    /// Mailbox domains held whole, e.g. `example.com` (subdomains included).
    #[serde(default)]
    #[schemars(length(max = 256), inner(length(min = 1, max = 253)))]
    pub domains: Vec<String>,

    /// Only records made at or after this time (RFC 3339) are held; absent: no lower bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+(Z|[+-][0-9]{2}:[0-9]{2})$"))]
    pub from: Option<String>,

    /// Only records made before this time (RFC 3339) are held; absent: no upper bound,
    /// so records made while the hold exists are held too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+(Z|[+-][0-9]{2}:[0-9]{2})$"))]
    pub until: Option<String>,

    /// Why the records are held (a matter or case reference), written to the audit log.
    #[schemars(length(min = 1, max = 1024))]
    pub reason: String,

    /// Who asked for the hold (a person or team), written to the audit log.
    #[schemars(length(min = 1, max = 256))]
    pub requested_by: String,
}

/// What the operator last observed about a LegalHold.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LegalHoldStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`: the hold is valid and purges skip what it matches; `Stalled` with reason
    /// `ReleaseNotConfirmed` while a deletion waits for its confirmation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// The held mailboxes and domains for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mailbox_summary: Option<String>,

    /// What retention has reached and this hold keeps, as last counted by the purges.
    #[serde(default)]
    pub held: HeldRecords,

    /// When `held` was last counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_counted: Option<Time>,

    /// The audit log index of the act of custody that recorded the hold as it is in force
    /// (placed, or last changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_index: Option<u64>,

    /// The `metadata.generation` that `logIndex` recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logged_generation: Option<i64>,
}

/// Records past their retention that a hold keeps.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HeldRecords {
    /// Archived raw messages.
    #[serde(default)]
    pub raw_messages: u64,
    /// Bytes of those raw messages.
    #[serde(default)]
    pub raw_message_bytes: u64,
    /// Delivery attempt records.
    #[serde(default)]
    pub attempts: u64,
    /// Dead letters (with their events).
    #[serde(default)]
    pub dead_letters: u64,
}

impl HeldRecords {
    pub fn is_empty(&self) -> bool {
        self.raw_messages == 0 && self.attempts == 0 && self.dead_letters == 0
    }

    pub fn add(&mut self, other: &HeldRecords) {
        self.raw_messages += other.raw_messages;
        self.raw_message_bytes += other.raw_message_bytes;
        self.attempts += other.attempts;
        self.dead_letters += other.dead_letters;
    }
}
