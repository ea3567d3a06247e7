//! The data of a delivery, shaped by the subscription's payload mode and redactions, and
//! the Standard Webhooks body around it (`{"type", "timestamp", "data"}`). The types here
//! are also what the published JSON Schemas are generated from (`mailhook schemagen`), so
//! the schemas cannot drift from what is sent.

use std::sync::Arc;

use schemars::JsonSchema;
use serde::Serialize;
use serde_json::Value;

use crate::api::{Direction, EventType, PayloadMode};
use crate::archive::{Link, LinkTo, RawLinks};
use crate::event::{Access, Login};
use crate::event::{
    AclGrant, Activity, Attachment, BulkAccess, ConfigChange, DeleteStage, Flag, FolderAction, ForwardTarget,
    Forwarding, MailboxEvent, domain_of,
};

use super::signing::pseudonym;

/// How one subscription wants its payloads.
#[derive(Debug, Clone)]
pub struct PayloadConfig {
    pub mode: PayloadMode,
    /// Top-level `data` fields removed from every delivery.
    pub redact: Vec<String>,
    /// Key for anonymized addresses; per subscription, so pseudonyms do not correlate
    /// across receivers.
    pub pseudonym_key: Vec<u8>,
    /// Signs links to archived raw messages when the subscription asks for them
    /// (`payload.includeRawMessageLink`).
    pub raw_links: Option<Arc<RawLinks>>,
    /// The subscription's UID: raw message links name it, and stop working without it.
    pub subscription: String,
}

impl PayloadConfig {
    /// This configuration within `ceiling`: a fuller mode is lowered to it, and raw links
    /// are dropped unless it allows them. Borrowed when nothing changes.
    pub fn capped(&self, ceiling: crate::route::Ceiling) -> std::borrow::Cow<'_, PayloadConfig> {
        let mode = self.mode.at_most(ceiling.mode);
        let links = ceiling.raw_links && mode == PayloadMode::Full;
        if mode == self.mode && (links || self.raw_links.is_none()) {
            return std::borrow::Cow::Borrowed(self);
        }
        std::borrow::Cow::Owned(PayloadConfig {
            mode,
            raw_links: self.raw_links.clone().filter(|_| links),
            ..self.clone()
        })
    }
}

/// Fields of `data` that `payload.redact` may not remove: receivers need them to tell
/// events apart and de-duplicate.
pub const UNREDACTABLE: [&str; 3] = ["eventId", "source", "occurredAt"];

/// The `data` of one event, whatever the payload mode; `V` is what the mode shows of the
/// people and the content. Borrowed from the event: one serialization, no JSON tree.
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Data<'a, V> {
    /// mailhook's id of the event (`evt_…`), the same for every subscription.
    pub event_id: &'a str,
    /// What reported it: `smtp` (the journal feed), `http` (the ingest API), `dovecot`, or
    /// `router` (a `compliance.flagged` event derived by MailboxFilters).
    pub source: &'a str,
    /// When it happened (RFC 3339).
    pub occurred_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// The folder concerned (IMAP name, UTF-8). Outside `full`, a folder whose name holds
    /// an address (another user's shared folder) is left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub folder: Option<&'a str>,
    /// Size of the message in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The producer's own id of the event (`full`); in the other modes an opaque id
    /// derived from it per subscription (`pid_…`), since producer ids can name people
    /// (a journal's holds the Message-ID and the mailbox).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub producer_event_id: Option<std::borrow::Cow<'a, str>>,
    /// The subscription's MailboxFilters that matched the event.
    pub matched_filters: &'a [String],
    /// `compliance.flagged`: the flags MailboxFilters put on the message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flags: Option<&'a [Flag]>,
    /// `compliance.flagged`: the event of the message that was flagged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flagged_event_id: Option<&'a str>,
    #[serde(flatten)]
    pub view: V,
    /// Who did what in the mailbox store (Dovecot events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activity: Option<ActivityView<'a>>,
    /// `payload.includeRawMessageLink`: where to fetch the archived raw message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_message: Option<RawRef<'a>>,
}

/// Who did what in the mailbox store. `full` shows it all; `anonymized` replaces the
/// users with pseudonyms; `metadata` keeps their domains; neither shows the client's
/// address nor a configuration change's arguments (they can name people).
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActivityView<'a> {
    /// The mailbox user (full), or its pseudonym (anonymized); absent in metadata.
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    /// Metadata mode: the user's domain.
    #[serde(skip_serializing_if = "Option::is_none")]
    user_domain: Option<&'a str>,
    /// Who authenticated, when not the user (an administrator or master user).
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_user: Option<String>,
    /// The change was made by an administrator or master user.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    admin_session: bool,
    /// The mail server's service: imap, lmtp, pop3, managesieve, doveadm...
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<&'a str>,
    /// The client's address (full mode only).
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_ip: Option<&'a str>,
    /// The mail server's session id (full mode only: it encodes the client's address).
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stage: Option<DeleteStage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<FolderAction>,
    /// A move's or rename's previous folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_folder: Option<&'a str>,
    /// The IMAP flags or keywords set or removed.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    imap_flags: std::borrow::Cow<'a, [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    change: Option<ConfigChange>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid_validity: Option<u32>,
    /// Found by the reconciler (the live notification was missed), not reported live.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    reconciled: bool,
    /// Done in one of mailhook's own sessions (its reconciler).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    mailhook_session: bool,
    /// message.accessed: how it was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    access: Option<Access>,
    /// mailbox.bulk_access: how many reads, when, and in which folders.
    #[serde(skip_serializing_if = "Option::is_none")]
    bulk: Option<BulkAccess>,
    /// mailbox.login: how the login went.
    #[serde(skip_serializing_if = "Option::is_none")]
    login: Option<Login>,
}

/// Free text from the mail system as a mode other than `full` may show it: left out when
/// it holds an address or a Message-ID (both have an `@`), e.g. a shared folder
/// `Other Users/alice@example.com/INBOX` or a keyword.
fn impersonal(text: &str, mode: PayloadMode) -> Option<&str> {
    (mode == PayloadMode::Full || !text.contains('@')).then_some(text)
}

fn activity_view<'a>(a: &'a Activity, mode: PayloadMode, anon: &dyn Fn(&str) -> String) -> ActivityView<'a> {
    let full = mode == PayloadMode::Full;
    let person = |who: &'a str| match mode {
        PayloadMode::Full => Some(who.to_string()),
        PayloadMode::Anonymized => Some(anon(who)),
        PayloadMode::Metadata => None,
    };
    ActivityView {
        user: person(&a.user),
        user_domain: (mode == PayloadMode::Metadata).then(|| domain_of(&a.user)).flatten(),
        auth_user: a.auth_user.as_deref().and_then(person),
        admin_session: a.admin_session,
        service: a.service.as_deref().and_then(|s| impersonal(s, mode)),
        remote_ip: a.remote_ip.as_deref().filter(|_| full),
        // A Dovecot session id encodes the client's address.
        session: a.session.as_deref().filter(|_| full),
        stage: a.stage,
        action: a.action,
        previous_folder: a.previous_folder.as_deref().and_then(|f| impersonal(f, mode)),
        imap_flags: if full || a.imap_flags.iter().all(|f| impersonal(f, mode).is_some()) {
            std::borrow::Cow::Borrowed(&a.imap_flags)
        } else {
            std::borrow::Cow::Owned(
                a.imap_flags
                    .iter()
                    .filter(|f| impersonal(f, mode).is_some())
                    .cloned()
                    .collect(),
            )
        },
        change: a.change.as_ref().map(|c| ConfigChange {
            detail: c.detail.clone().filter(|_| full),
            target: c.target.clone().filter(|t| impersonal(t, mode).is_some()),
            command: impersonal(&c.command, mode).unwrap_or("?").to_string(),
            forwarding: c.forwarding.as_ref().map(|f| Forwarding {
                targets: f
                    .targets
                    .iter()
                    .map(|t| ForwardTarget {
                        address: t.address.as_deref().and_then(person),
                        ..t.clone()
                    })
                    .collect(),
                unresolved: f
                    .unresolved
                    .iter()
                    .filter(|u| full || impersonal(u, mode).is_some())
                    .cloned()
                    .collect(),
                // The reason quotes the server and the script: a fixed word outside `full`.
                unreadable: f
                    .unreadable
                    .as_ref()
                    .map(|u| if full { u.clone() } else { "unreadable".to_string() }),
                external: f.external,
                active: f.active,
            }),
            acl: c.acl.as_ref().map(|g| AclGrant {
                // `anyone`, `owner`, `$group`... name nobody; a user is a person.
                identifier: g.identifier.as_deref().and_then(|id| {
                    if AclGrant::names_person(id) {
                        person(id)
                    } else {
                        impersonal(id, mode).map(String::from)
                    }
                }),
                folder: impersonal(&g.folder, mode).unwrap_or("?").to_string(),
                ..g.clone()
            }),
            ..c.clone()
        }),
        uid: a.uid,
        uid_validity: a.uid_validity,
        reconciled: a.reconciled,
        mailhook_session: a.mailhook_session,
        access: a.access.clone(),
        bulk: a.bulk.as_ref().map(|b| BulkAccess {
            folders: b
                .folders
                .iter()
                .filter(|f| impersonal(f, mode).is_some())
                .cloned()
                .collect(),
            ..b.clone()
        }),
        login: a.login.clone(),
    }
}

/// Where to fetch the archived raw message, and how to check it is the one.
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RawRef<'a> {
    #[serde(flatten)]
    link: Link,
    /// SHA-256 (hex) of the raw message.
    sha256: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
}

/// `full`: everything, including the subject and addresses.
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FullView<'a> {
    /// The mailbox the event concerns.
    pub mailbox: &'a str,
    /// The message's Message-ID header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<&'a str>,
    pub to: &'a [String],
    pub cc: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<&'a str>,
    pub attachments: &'a [Attachment],
}

/// `anonymized`: as full, with every address a stable keyed pseudonym
/// (`anon-<hex>@<domain>`), and no subject, Message-ID or attachment names.
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnonymizedView<'a> {
    pub mailbox: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub attachments: Vec<Unnamed<'a>>,
}

/// `metadata`: domains, counts, sizes and types; no address, subject or attachment name.
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetadataView<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mailbox_domain: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender_domain: Option<&'a str>,
    pub recipient_domains: Vec<&'a str>,
    pub recipient_count: usize,
    pub attachments: Vec<Unnamed<'a>>,
}

/// An attachment without its name (names can identify people and deals).
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Unnamed<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<&'a str>,
}

fn unnamed(event: &MailboxEvent, mode: PayloadMode) -> Vec<Unnamed<'_>> {
    event
        .attachments
        .iter()
        .map(|a| Unnamed {
            // Its media type only: parameters can carry a file name (`name=`).
            content_type: a
                .content_type
                .as_deref()
                .map(|t| t.split(';').next().unwrap_or_default().trim())
                .and_then(|t| impersonal(t, mode)),
            size: a.size,
            sha256: a.sha256.as_deref().and_then(|t| impersonal(t, mode)),
        })
        .collect()
}

/// An address as anonymized payloads show it.
fn anonymize(cfg: &PayloadConfig, address: &str) -> String {
    format!(
        "anon-{}@{}",
        pseudonym(&cfg.pseudonym_key, address),
        domain_of(address).unwrap_or("invalid")
    )
}

/// The mailbox as the subscription's payload mode shows it (a CloudEvent's `subject`);
/// None in metadata mode, which shows no address.
pub fn shown_mailbox(event: &MailboxEvent, cfg: &PayloadConfig) -> Option<String> {
    match cfg.mode {
        PayloadMode::Full => Some(event.mailbox.clone()),
        PayloadMode::Anonymized => Some(anonymize(cfg, &event.mailbox)),
        PayloadMode::Metadata => None,
    }
}

/// The common fields of `data` around a mode's view.
fn data<'a, V>(event: &'a MailboxEvent, matched_filters: &'a [String], cfg: &PayloadConfig, view: V) -> Data<'a, V> {
    let anon = |a: &str| anonymize(cfg, a);
    Data {
        // A dead-letter copy shows the event as it was first delivered.
        event_id: event.dead_letter.as_ref().map_or(&event.id, |n| &n.event_id),
        source: event.source.as_str(),
        occurred_at: event.occurred_at.to_string(),
        direction: event.direction,
        folder: event.folder.as_deref().and_then(|f| impersonal(f, cfg.mode)),
        size: event.size,
        // A dead-letter copy is a new event: the original's id would make receivers drop it.
        producer_event_id: event
            .producer_event_id
            .as_deref()
            .filter(|_| event.dead_letter.is_none())
            .map(|id| match cfg.mode {
                PayloadMode::Full => std::borrow::Cow::Borrowed(id),
                _ => std::borrow::Cow::Owned(format!("pid_{}", pseudonym(&cfg.pseudonym_key, id))),
            }),
        matched_filters,
        flags: (!event.flags.is_empty()).then_some(event.flags.as_slice()),
        flagged_event_id: if event.flags.is_empty() {
            None
        } else {
            event.flagged_event_id.as_deref()
        },
        view,
        activity: event.activity.as_deref().map(|a| activity_view(a, cfg.mode, &anon)),
        raw_message: match (&cfg.raw_links, &event.raw_message) {
            // The raw message shows everything the other modes hide.
            (Some(links), Some(sha256)) if cfg.mode == PayloadMode::Full => Some(RawRef {
                link: links.link(
                    &LinkTo {
                        sha256,
                        subscription: &cfg.subscription,
                        mailbox: &event.mailbox,
                        event_type: event.event_type.as_str(),
                    },
                    jiff::Timestamp::now(),
                ),
                sha256,
                size: event.size,
            }),
            _ => None,
        },
    }
}

/// Serializes `data`, dropping the redacted fields (through a JSON tree only when there
/// are some).
fn finish<T: Serialize>(data: &T, redact: &[String]) -> Vec<u8> {
    if redact.is_empty() {
        return serde_json::to_vec(data).unwrap_or_default();
    }
    let mut tree = serde_json::to_value(data).unwrap_or(Value::Null);
    if let Some(fields) = tree.as_object_mut() {
        for field in redact {
            fields.remove(field);
        }
    }
    serde_json::to_vec(&tree).unwrap_or_default()
}

/// The event's `data` as JSON, in the subscription's payload mode.
pub fn render_data(event: &MailboxEvent, matched_filters: &[String], cfg: &PayloadConfig) -> Vec<u8> {
    match cfg.mode {
        PayloadMode::Full => {
            let view = FullView {
                mailbox: &event.mailbox,
                message_id: event.message_id.as_deref(),
                from: event.from.as_deref(),
                to: &event.to,
                cc: &event.cc,
                subject: event.subject.as_deref(),
                attachments: &event.attachments,
            };
            finish(&data(event, matched_filters, cfg, view), &cfg.redact)
        }
        PayloadMode::Anonymized => {
            let view = AnonymizedView {
                mailbox: anonymize(cfg, &event.mailbox),
                from: event.from.as_deref().map(|a| anonymize(cfg, a)),
                to: event.to.iter().map(|a| anonymize(cfg, a)).collect(),
                cc: event.cc.iter().map(|a| anonymize(cfg, a)).collect(),
                attachments: unnamed(event, cfg.mode),
            };
            finish(&data(event, matched_filters, cfg, view), &cfg.redact)
        }
        PayloadMode::Metadata => {
            let mut domains: Vec<&str> = event.to.iter().chain(&event.cc).filter_map(|a| domain_of(a)).collect();
            domains.sort_unstable();
            domains.dedup();
            let view = MetadataView {
                mailbox_domain: domain_of(&event.mailbox),
                sender_domain: event.from.as_deref().and_then(domain_of),
                recipient_domains: domains,
                recipient_count: event.to.len() + event.cc.len(),
                attachments: unnamed(event, cfg.mode),
            };
            finish(&data(event, matched_filters, cfg, view), &cfg.redact)
        }
    }
}

/// Why a dead-letter sink was sent the event, as Standard Webhooks bodies carry it
/// (`deadLetter`).
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterView<'a> {
    /// The subscription whose endpoint refused the event, as `namespace/name`.
    pub subscription: &'a str,
    /// That endpoint: scheme, host, port and path.
    pub endpoint: &'a str,
    /// The `webhook-id` that endpoint was sent.
    pub webhook_id: &'a str,
    /// Why it was given up.
    pub reason: &'a str,
    pub attempts: u32,
    /// The last HTTP status the endpoint answered, if it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    /// The last error (HTTP status or transport error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<&'a str>,
    /// When it was given up (RFC 3339).
    pub dead_lettered_at: String,
}

impl<'a> DeadLetterView<'a> {
    pub fn of(note: &'a crate::event::DeadLetterNote) -> DeadLetterView<'a> {
        DeadLetterView {
            subscription: &note.subscription,
            endpoint: &note.endpoint,
            webhook_id: &note.webhook_id,
            reason: &note.reason,
            attempts: note.attempts,
            last_status: note.last_status,
            last_error: note.last_error.as_deref(),
            dead_lettered_at: note.dead_lettered_at.to_string(),
        }
    }
}

/// A Standard Webhooks body: the event type, when it happened, and its data.
#[derive(Serialize)]
pub struct Body<'a> {
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub timestamp: String,
    pub data: &'a serde_json::value::RawValue,
    #[serde(rename = "deadLetter", skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterView<'a>>,
}

/// The Standard Webhooks body of one event (what `format: standardWebhooks` sends).
pub fn render(event: &MailboxEvent, matched_filters: &[String], cfg: &PayloadConfig) -> Vec<u8> {
    let data = render_data(event, matched_filters, cfg);
    body(event, &data)
}

/// The Standard Webhooks body around already rendered `data`.
pub fn body(event: &MailboxEvent, data: &[u8]) -> Vec<u8> {
    let Ok(raw) = serde_json::from_slice::<&serde_json::value::RawValue>(data) else {
        return Vec::new();
    };
    let body = Body {
        event_type: event.event_type,
        timestamp: event.occurred_at.to_string(),
        data: raw,
        dead_letter: event.dead_letter.as_deref().map(DeadLetterView::of),
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> MailboxEvent {
        serde_json::from_value(json!({
            "id": "evt_1", "type": "message.received", "occurredAt": "2026-01-01T00:00:00Z",
            "receivedAt": "2026-01-01T00:00:00Z", "source": "http", "mailbox": "alice@finance.example.com",
            "from": "bob@partner.org", "to": ["alice@finance.example.com"], "cc": ["carol@partner.org"],
            "bcc": ["secret@example.com"], "subject": "Merger plans",
            "attachments": [{"name": "plans-alice.pdf", "contentType": "application/pdf", "size": 10}]
        }))
        .expect("event")
    }

    fn cfg(mode: PayloadMode) -> PayloadConfig {
        PayloadConfig {
            mode,
            redact: vec![],
            pseudonym_key: b"key".to_vec(),
            raw_links: None,
            subscription: "sub".into(),
        }
    }

    fn text(mode: PayloadMode) -> String {
        String::from_utf8(render(&event(), &["f".into()], &cfg(mode))).expect("utf8")
    }

    #[test]
    fn full_payload_shape() {
        let body: Value =
            serde_json::from_slice(&render(&event(), &["f".into()], &cfg(PayloadMode::Full))).expect("json");
        assert_eq!(
            body,
            json!({
                "type": "message.received",
                "timestamp": "2026-01-01T00:00:00Z",
                "data": {
                    "eventId": "evt_1", "source": "http", "occurredAt": "2026-01-01T00:00:00Z",
                    "matchedFilters": ["f"], "mailbox": "alice@finance.example.com",
                    "from": "bob@partner.org", "to": ["alice@finance.example.com"],
                    "cc": ["carol@partner.org"], "subject": "Merger plans",
                    "attachments": [{"name": "plans-alice.pdf", "contentType": "application/pdf", "size": 10}]
                }
            })
        );
    }

    #[test]
    fn full_carries_everything_but_bcc() {
        let t = text(PayloadMode::Full);
        assert!(t.contains("Merger plans") && t.contains("bob@partner.org") && t.contains("plans-alice.pdf"));
        assert!(!t.contains("secret@example.com"), "bcc is never delivered");
        assert!(t.starts_with(r#"{"data":"#) || t.contains(r#""type":"message.received""#));
    }

    #[test]
    fn metadata_and_anonymized_carry_no_subject_and_no_real_address() {
        for mode in [PayloadMode::Metadata, PayloadMode::Anonymized] {
            let t = text(mode);
            for secret in ["Merger plans", "alice@", "bob@", "carol@", "secret@", "plans-alice"] {
                assert!(!t.contains(secret), "{mode:?} leaks {secret}: {t}");
            }
        }
        assert!(text(PayloadMode::Metadata).contains(r#""senderDomain":"partner.org""#));
        assert!(
            text(PayloadMode::Anonymized).contains("@partner.org"),
            "pseudonyms keep the domain"
        );
    }

    #[test]
    fn activity_shows_people_and_arguments_in_full_payloads_only() {
        use crate::event::{Activity, ConfigChange, ConfigKind};
        let mut e = event();
        e.source = crate::event::Source::Dovecot;
        e.producer_event_id = Some("dovecot:alice@finance.example.com:INBOX:5:1:in".into());
        e.activity = Some(Box::new(Activity {
            session: Some("wmFBEtxh2Jx/AAAB".into()),
            user: "alice@finance.example.com".into(),
            auth_user: Some("admin@finance.example.com".into()),
            admin_session: true,
            service: Some("imap".into()),
            remote_ip: Some("192.0.2.7".into()),
            change: Some(ConfigChange {
                kind: ConfigKind::Acl,
                command: "SETACL".into(),
                target: Some("INBOX".into()),
                detail: Some("INBOX bob@partner.org lr".into()),
                forwarding: None,
                acl: None,
            }),
            reconciled: true,
            ..Default::default()
        }));
        let body = |mode| -> Value { serde_json::from_slice(&render(&e, &[], &cfg(mode))).expect("json") };
        let full = body(PayloadMode::Full);
        assert_eq!(full["data"]["activity"]["authUser"], "admin@finance.example.com");
        assert_eq!(full["data"]["activity"]["remoteIp"], "192.0.2.7");
        assert_eq!(full["data"]["activity"]["change"]["detail"], "INBOX bob@partner.org lr");
        assert_eq!(full["data"]["activity"]["reconciled"], true);
        for mode in [PayloadMode::Metadata, PayloadMode::Anonymized] {
            let b = body(mode);
            let t = b.to_string();
            for secret in ["alice@", "admin@", "192.0.2.7", "bob@", "wmFBEtxh2Jx"] {
                assert!(!t.contains(secret), "{mode:?} leaks {secret}: {t}");
            }
            assert_eq!(b["data"]["activity"]["adminSession"], true, "{mode:?}");
            assert_eq!(b["data"]["activity"]["change"]["kind"], "acl", "{mode:?}");
        }
        let metadata = body(PayloadMode::Metadata);
        assert_eq!(metadata["data"]["activity"]["userDomain"], "finance.example.com");
        let anonymized = body(PayloadMode::Anonymized);
        assert!(
            anonymized["data"]["activity"]["user"]
                .as_str()
                .is_some_and(|u| u.starts_with("anon-") && u.ends_with("@finance.example.com"))
        );
    }

    #[test]
    fn redaction_removes_fields() {
        let mut c = cfg(PayloadMode::Full);
        c.redact = vec!["subject".into(), "cc".into()];
        let t = String::from_utf8(render(&event(), &[], &c)).expect("utf8");
        assert!(!t.contains("Merger plans") && !t.contains("carol@"));
    }

    #[test]
    fn a_ceiling_lowers_the_mode_and_drops_raw_links_and_borrows_otherwise() {
        use crate::route::Ceiling;
        let mut full = cfg(PayloadMode::Full);
        full.raw_links = Some(Arc::new(RawLinks::new(
            [1; 32],
            "https://m.example",
            std::time::Duration::from_secs(60),
        )));
        assert!(matches!(full.capped(Ceiling::NONE), std::borrow::Cow::Borrowed(_)));
        let metadata = Ceiling {
            mode: PayloadMode::Metadata,
            raw_links: false,
        };
        let capped = full.capped(metadata);
        assert_eq!(capped.mode, PayloadMode::Metadata);
        assert!(capped.raw_links.is_none());
        let full_no_links = Ceiling {
            mode: PayloadMode::Full,
            raw_links: false,
        };
        let capped = full.capped(full_no_links);
        assert_eq!((capped.mode, capped.raw_links.is_none()), (PayloadMode::Full, true));
        // A subscription asking for less than the ceiling keeps what it asked for.
        let anonymized = cfg(PayloadMode::Anonymized);
        assert!(matches!(
            anonymized.capped(Ceiling::NONE),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(anonymized.capped(metadata).mode, PayloadMode::Metadata);
    }
}
