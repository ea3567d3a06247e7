//! Vocabulary shared by both kinds: event types, directions, references.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The kind of mailbox activity an event reports.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum EventType {
    /// A message arrived in a mailbox.
    #[serde(rename = "message.received")]
    MessageReceived,
    /// A mailbox sent a message to an external recipient.
    #[serde(rename = "message.sent")]
    MessageSent,
    /// A message travelled between two internal mailboxes.
    #[serde(rename = "message.internal")]
    MessageInternal,
    /// A message was deleted from a mailbox: `activity.stage` says `soft` (marked
    /// `\Deleted` or moved to the trash folder) or `hard` (expunged).
    #[serde(rename = "message.deleted")]
    MessageDeleted,
    /// A message moved from one folder (`activity.previousFolder`) to another (`folder`).
    #[serde(rename = "message.moved")]
    MessageMoved,
    /// Flags or keywords were set on a message (`activity.imapFlags`), e.g. `\Flagged`, `\Seen`.
    #[serde(rename = "message.flagged")]
    MessageFlagged,
    /// Flags or keywords were removed from a message (`activity.imapFlags`).
    #[serde(rename = "message.unflagged")]
    MessageUnflagged,
    /// A folder was created, renamed, deleted, subscribed or unsubscribed
    /// (`activity.action`; a rename names the old folder in `activity.previousFolder`).
    #[serde(rename = "folder.changed")]
    FolderChanged,
    /// A mailbox's configuration changed: Sieve scripts (filtering and forwarding rules),
    /// access rights (ACLs) or metadata (`activity.change`).
    #[serde(rename = "mailbox.config_changed")]
    MailboxConfigChanged,
    /// A MailboxFilter with a `flag` matched a message.
    #[serde(rename = "compliance.flagged")]
    ComplianceFlagged,
    /// A message was read: its body opened over IMAP (a first read, a re-read, a
    /// `BODY.PEEK`) or POP3, by the owner, a delegate or a master/admin session
    /// (`activity.access`).
    #[serde(rename = "message.accessed")]
    MessageAccessed,
    /// One session read many messages in a short window: one event with the count
    /// (`activity.bulk`) instead of one per message.
    #[serde(rename = "mailbox.bulk_access")]
    MailboxBulkAccess,
    /// A login succeeded or failed (`activity.login`); repeated failures of one user from
    /// one address are one event with a count.
    #[serde(rename = "mailbox.login")]
    MailboxLogin,
}

impl EventType {
    pub const ALL: [EventType; 13] = [
        EventType::MessageReceived,
        EventType::MessageSent,
        EventType::MessageInternal,
        EventType::MessageDeleted,
        EventType::MessageMoved,
        EventType::MessageFlagged,
        EventType::MessageUnflagged,
        EventType::FolderChanged,
        EventType::MailboxConfigChanged,
        EventType::ComplianceFlagged,
        EventType::MessageAccessed,
        EventType::MailboxBulkAccess,
        EventType::MailboxLogin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::MessageReceived => "message.received",
            EventType::MessageSent => "message.sent",
            EventType::MessageInternal => "message.internal",
            EventType::MessageDeleted => "message.deleted",
            EventType::MessageMoved => "message.moved",
            EventType::MessageFlagged => "message.flagged",
            EventType::MessageUnflagged => "message.unflagged",
            EventType::FolderChanged => "folder.changed",
            EventType::MailboxConfigChanged => "mailbox.config_changed",
            EventType::ComplianceFlagged => "compliance.flagged",
            EventType::MessageAccessed => "message.accessed",
            EventType::MailboxBulkAccess => "mailbox.bulk_access",
            EventType::MailboxLogin => "mailbox.login",
        }
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which way a message travelled, judged against the operator's internal domains.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Direction {
    /// From outside the organisation to an internal mailbox.
    Inbound,
    /// From an internal mailbox to at least one external recipient.
    Outbound,
    /// Between internal mailboxes only.
    Internal,
}

/// A reference to a Secret in the same namespace as the resource.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretRef {
    /// Name of the Secret, in the resource's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A single key of a Secret in the same namespace as the resource.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret, in the resource's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}
