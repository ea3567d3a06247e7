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
}

impl MailboxEvent {
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
