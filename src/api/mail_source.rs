//! `MailSource`: the cluster-scoped resource with which a cluster admin declares a feed
//! that must keep reporting (the SMTP journal, a Dovecot server's credential, an HTTP
//! producer's credential). The operator says on it when the feed last sent an event, and
//! turns it `Ready=False/Silent` once the feed has been quiet for longer than allowed: a
//! silent compliance feed is an incident, not a quiet day.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::webhook_subscription::POSITIVE_DURATION;

/// A feed that must keep sending events; `Ready=False/Silent` once it has been quiet for
/// longer than `silentAfter`. Only cluster admins should create these.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailhook.io",
    version = "v1alpha1",
    kind = "MailSource",
    shortname = "msrc",
    category = "mailhook",
    status = "MailSourceStatus",
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".spec.source"}"#,
    printcolumn = r#"{"name":"Producer","type":"string","jsonPath":".spec.producer"}"#,
    printcolumn = r#"{"name":"Silent After","type":"string","jsonPath":".spec.silentAfter"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Last Event","type":"date","jsonPath":".status.lastEventAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.source != 'smtp' || self.producer == 'journal'").message("spec.producer of an smtp source must be journal: the SMTP journal feed is one producer, whichever MTA sends it"))]
pub struct MailSourceSpec {
    /// Where the events arrive: `smtp` (the journal feed on `--smtp-addr`), `http` (the
    /// ingest API, `POST /v1/events`) or `dovecot` (the Dovecot routes of the ingest API).
    pub source: SourceKind,

    /// Who sends them: for `http` and `dovecot` the name of the credential in the token
    /// file (`NAME TOKEN` lines; a bare token is named after its file's kind, `ingest` or
    /// `dovecot`); for `smtp`, `journal`.
    #[schemars(length(max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9._-]{1,63}$')").message("spec.producer must be a credential name (1 to 63 letters, digits, '.', '_' or '-'), or journal for an smtp source"))]
    pub producer: String,

    /// How long the feed may send nothing before it counts as silent, as a duration such
    /// as `30m` or `2h` (seconds are allowed, e.g. for a test). Default `30m`.
    #[serde(default = "default_silent_after")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(POSITIVE_DURATION).message("spec.silentAfter must be a positive duration such as 30m, 2h or 45s"))]
    pub silent_after: String,
}

fn default_silent_after() -> String {
    "30m".to_string()
}

/// A source of events, as a MailSource names it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Smtp,
    Http,
    Dovecot,
}

impl SourceKind {
    /// The name on the wire, the `source` label of the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Smtp => "smtp",
            SourceKind::Http => "http",
            SourceKind::Dovecot => "dovecot",
        }
    }
}

/// What the operator last observed about a MailSource.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MailSourceStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`: True (`Reporting`) while the feed sends events within `silentAfter`;
    /// False (`Silent`) once it has not, with how long and what to check.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// When the feed's last events were committed, on any replica; absent while it has
    /// never been heard from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_at: Option<Time>,
}
