//! `MailboxEvent`: the one normalized shape every source produces and every other part
//! (store, router, delivery) consumes. Depends on `api` only.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::{Direction, EventType, Severity};

/// Where an event came from; a metrics label and part of the delivered data.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum Source {
    Http,
    Smtp,
    /// Derived by the router (compliance.flagged).
    Router,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Http => "http",
            Source::Smtp => "smtp",
            Source::Router => "router",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
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
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
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
