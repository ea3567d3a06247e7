//! `MailboxEvent`: the one normalized shape every source produces and every other part
//! (store, router, delivery) consumes. Depends on `api` only.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::{Direction, EventType, Severity};

/// Where an event came from; a metrics label and part of the delivered data.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Source {
    Http,
    Smtp,
    /// A Dovecot server's push notifications and exported events, or the reconciler.
    Dovecot,
    /// Derived by the router (compliance.flagged).
    Router,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Http => "http",
            Source::Smtp => "smtp",
            Source::Dovecot => "dovecot",
            Source::Router => "router",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl Attachment {
    /// Lower-cased extension of the file name, without the dot.
    pub fn extension(&self) -> Option<String> {
        let name = self.name.as_deref()?;
        let (_, ext) = name.rsplit_once('.')?;
        (!ext.is_empty()).then(|| ext.to_lowercase())
    }
}

/// A compliance flag a MailboxFilter put on a message.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Flag {
    pub name: String,
    pub severity: Severity,
    /// The MailboxFilter that set it.
    pub filter: String,
}

/// One mailbox event. Addresses and header names are lower-cased by the source.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MailboxEvent {
    /// Assigned by mailhook: `evt_<uuid v7>`, time-ordered.
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub occurred_at: jiff::Timestamp,
    pub received_at: jiff::Timestamp,
    pub source: Source,
    /// The producer's own id; a repeat is acknowledged but not delivered again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub producer_event_id: Option<String>,
    pub mailbox: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default)]
    pub to: Vec<String>,
    #[serde(default)]
    pub cc: Vec<String>,
    #[serde(default)]
    pub bcc: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folder: Option<String>,
    /// Header names lower-cased.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Set on compliance.flagged events: the flags and the message event they concern.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<Flag>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flagged_event_id: Option<String>,
    /// Namespace of the filters that flagged it (compliance.flagged only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag_namespace: Option<String>,
    /// SHA-256 (hex) of the raw message archived with the event, if one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_message: Option<String>,
    /// Who did what inside the mailbox store (sources that see it: Dovecot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity: Option<Box<Activity>>,
    /// Set on the copy of an event sent to a dead-letter sink: why its delivery died.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<Box<DeadLetterNote>>,
    /// Whose `producer_event_id` it is, beside the source: the ingest credential's name for
    /// HTTP events, the journaled message's SHA-256 for SMTP ones (whose ids are built from
    /// a Message-ID the sender chose). Only read at ingest, to de-duplicate (see
    /// [`MailboxEvent::dedup_key`]); never stored or sent.
    #[serde(skip)]
    pub producer_scope: Option<String>,
    /// Where its acceptance is in the audit log, once the commit that stored it said so
    /// (or the store, when it is read back). Not part of the event: never stored with it,
    /// and deliveries carry it apart (a header, a CloudEvents extension).
    #[serde(skip)]
    pub log_index: LogIndex,
}

/// The audit log index of an event's acceptance, set once by the commit that appended it.
/// Ignored when events are compared. A clone is a copy of what is known then, not shared:
/// an event cloned into another (a flag, a dead-letter copy) has a leaf of its own, whose
/// index must not land in the original. Only `share` gives a handle to the same slot.
#[derive(Default)]
pub struct LogIndex(std::sync::Arc<std::sync::OnceLock<u64>>);

impl Clone for LogIndex {
    fn clone(&self) -> LogIndex {
        let copy = LogIndex::default();
        if let Some(index) = self.get() {
            copy.set(index);
        }
        copy
    }
}

impl LogIndex {
    pub fn get(&self) -> Option<u64> {
        self.0.get().copied()
    }

    pub fn set(&self, index: u64) {
        let _ = self.0.set(index);
    }

    /// The same slot: what is set through one is seen through the other.
    pub fn share(&self) -> LogIndex {
        LogIndex(self.0.clone())
    }
}

impl PartialEq for LogIndex {
    fn eq(&self, _: &LogIndex) -> bool {
        true
    }
}

impl Eq for LogIndex {}

impl std::fmt::Debug for LogIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LogIndex({:?})", self.get())
    }
}

impl MailboxEvent {
    /// What de-duplicates this event: its producer id within its source and scope, so a
    /// producer can repeat only its own events — an HTTP producer cannot pre-empt a
    /// journaled message or another credential's event, and a sender choosing a Message-ID
    /// cannot pre-empt a different message carrying the same one.
    pub fn dedup_key(&self) -> Option<String> {
        let id = self.producer_event_id.as_deref()?;
        let scope = self.producer_scope.as_deref().unwrap_or("");
        Some(format!("{}:{scope}:{id}", self.source.as_str()))
    }
}

/// Why a delivery was given up, carried to the dead-letter sink with a copy of its event.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterNote {
    /// The event as it was first delivered (the copy has an id of its own).
    pub event_id: String,
    /// The subscription whose endpoint refused it, as `namespace/name`.
    pub subscription: String,
    /// The endpoint that refused it: scheme, host, port and path (no query).
    pub endpoint: String,
    /// The `webhook-id` that endpoint was sent.
    pub webhook_id: String,
    /// Why it was given up (retries exhausted, too old, ...), with the last error.
    pub reason: String,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub dead_lettered_at: jiff::Timestamp,
    /// Set when the sink is an endpoint (`deadLetterSink.uri`): the copy is delivered
    /// there by the subscription it died in, instead of to its endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink_uri: Option<String>,
}

/// How far a deletion went.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DeleteStage {
    /// Marked `\Deleted`, or moved to the trash folder: still recoverable.
    Soft,
    /// Expunged: gone from the mailbox.
    Hard,
}

/// What happened to a folder (`folder.changed`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FolderAction {
    Created,
    Renamed,
    Deleted,
    Subscribed,
    Unsubscribed,
}

/// Which part of a mailbox's configuration changed (`mailbox.config_changed`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ConfigKind {
    /// Sieve scripts: filtering, forwarding and vacation rules.
    Sieve,
    /// Access rights granted to other users (IMAP ACL).
    Acl,
    /// Mailbox or server metadata (IMAP METADATA).
    Metadata,
}

/// A configuration change: what kind, the command, and what it named.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigChange {
    pub kind: ConfigKind,
    /// The protocol command, e.g. `PUTSCRIPT`, `SETACTIVE`, `SETACL`, `SETMETADATA`.
    pub command: String,
    /// What it changed: the script's name, or the folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The command's arguments as the server logged them (e.g. an ACL's identifier and
    /// rights); shown in `full` payloads only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Sieve: where the script the command names sends mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarding: Option<Forwarding>,
    /// ACL: the entry that changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acl: Option<AclGrant>,
}

/// Who did what inside the mailbox store, as the mail server reported it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Activity {
    /// The mailbox user the change was made in.
    pub user: String,
    /// Who authenticated, when not the user: an administrator or master user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    /// True when `authUser` differs from `user` (a master-user or admin session).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin_session: bool,
    /// The server's service: `imap`, `lmtp`, `lda`, `doveadm`, `managesieve`, `pop3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The client's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_ip: Option<String>,
    /// The server's session id (joins with its logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// message.deleted: soft or hard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<DeleteStage>,
    /// folder.changed: what happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<FolderAction>,
    /// message.moved: the source folder; folder.changed (renamed): the old name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_folder: Option<String>,
    /// message.flagged / message.unflagged: the flags and keywords set or removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub imap_flags: Vec<String>,
    /// mailbox.config_changed: what changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<ConfigChange>,
    /// The message's IMAP UID and its folder's UIDVALIDITY.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid_validity: Option<u32>,
    /// Found by the reconciler after a gap, not heard live: the time is when it was found.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reconciled: bool,
    /// Done in one of mailhook's own sessions (its reconciler's master user): labelled so
    /// that filters leave it out unless they ask for it (`mailhookSessions`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mailhook_session: bool,
    /// message.accessed: how the message was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<Access>,
    /// mailbox.bulk_access: how many reads one session made in a window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulk: Option<BulkAccess>,
    /// mailbox.login: who tried to log in, how, and how it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<Login>,
}

/// How a message was read (`message.accessed`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Access {
    /// The protocol command that read it: `FETCH`, `UID FETCH`, `RETR`, `TOP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Why the server opened the message, as it says (e.g. `imap:fetch_body`,
    /// `pop3:cmd_retr`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}

/// Many reads by one session, reported once (`mailbox.bulk_access`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BulkAccess {
    /// Message reads counted in the window.
    pub reads: u64,
    /// Folders read from (at most 64 listed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub folders: Vec<String>,
    /// First and last read of the window.
    #[schemars(with = "String")]
    pub first_at: jiff::Timestamp,
    #[schemars(with = "String")]
    pub last_at: jiff::Timestamp,
}

/// A login attempt (`mailbox.login`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Login {
    pub outcome: LoginOutcome,
    /// The SASL mechanism, e.g. `PLAIN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mechanism: Option<String>,
    /// Why it failed, as the server says: `password_mismatch`, `user_unknown`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Failed attempts of the same user from the same address reported by this one event
    /// (1 unless repeated failures were aggregated), and the window they fell in.
    pub attempts: u64,
    #[schemars(with = "String")]
    pub first_at: jiff::Timestamp,
    #[schemars(with = "String")]
    pub last_at: jiff::Timestamp,
}

impl AclGrant {
    /// Whether an ACL identifier names a person (a user), not everyone, every
    /// authenticated user, the owner, or a group (RFC 4314; Dovecot's `$group`, `group=`).
    pub fn names_person(identifier: &str) -> bool {
        let id = identifier.trim_start_matches('-');
        !(matches!(id, "anyone" | "authenticated" | "owner" | "")
            || id.starts_with('$')
            || id.starts_with("group=")
            || id.starts_with("group-override="))
    }
}

/// How a login ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LoginOutcome {
    Succeeded,
    Failed,
}

/// Where the Sieve script a change names sends mail (`mailbox.config_changed` of kind
/// `sieve`): the uploaded script for `PUTSCRIPT`, the activated one for `SETACTIVE`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Forwarding {
    /// Addresses the script sends to: redirects, vacation `:from`, `mailto:` notifications.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<ForwardTarget>,
    /// Actions whose target the script does not name (a variable, an included script, a
    /// pipe): they may leave the organisation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unresolved: Vec<String>,
    /// True when a target is outside `--internal-domains`, or a target is unresolved.
    pub external: bool,
    /// The script could not be read (too large, not Sieve, not fetched): nothing above is
    /// known, and `external` is true. The reason in `full` payloads only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
    /// Whether the script is the one that runs on delivery (an uploaded script that is
    /// not active forwards nothing until it is activated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
}

/// One address a Sieve script sends to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForwardTarget {
    /// The address (left out of `metadata` payloads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Its domain, lower-cased.
    pub domain: String,
    /// `redirect`, `vacationFrom` or `notify`.
    pub action: ForwardAction,
    pub external: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ForwardAction {
    Redirect,
    VacationFrom,
    Notify,
}

/// Who was granted or lost which rights on which folder (`mailbox.config_changed` of kind
/// `acl`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AclGrant {
    pub folder: String,
    /// A user, `anyone`, `authenticated`, `owner` or `$group` (a user is left out of
    /// `metadata` payloads and pseudonymised in `anonymized` ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier: Option<String>,
    /// `add`, `remove`, `replace` or `delete` (the entry removed).
    pub mode: String,
    /// RFC 4314 rights by name, e.g. `read`, `lookup`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rights: Vec<String>,
    /// A negative entry: rights denied.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub negative: bool,
    /// Someone may now do something they could not.
    pub granted: bool,
    /// Someone may now read the folder's mail.
    pub read_granted: bool,
}

impl MailboxEvent {
    /// A new event made from this one (a flag, a dead-letter copy): a new id, and no log
    /// index until its own acceptance is logged.
    pub fn derive(&self) -> MailboxEvent {
        let mut derived = self.clone();
        derived.id = MailboxEvent::new_id();
        derived.log_index = LogIndex::default();
        derived
    }

    pub fn new_id() -> String {
        format!("evt_{}", uuid::Uuid::now_v7().simple())
    }

    /// Every recipient: To, Cc and Bcc.
    pub fn recipients(&self) -> impl Iterator<Item = &str> {
        self.to.iter().chain(&self.cc).chain(&self.bcc).map(String::as_str)
    }
}

/// The domain of an address (`a@b.example` → `b.example`).
pub fn domain_of(address: &str) -> Option<&str> {
    address.rsplit_once('@').map(|(_, d)| d)
}
