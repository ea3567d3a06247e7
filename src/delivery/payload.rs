//! The JSON body of a delivery: `{"type", "timestamp", "data"}`, shaped by the
//! subscription's payload mode and redactions.

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::api::{Direction, EventType, PayloadMode};
use crate::archive::{Link, RawLinks};
use crate::event::{Activity, Attachment, ConfigChange, DeleteStage, Flag, FolderAction, MailboxEvent, domain_of};

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
}

/// The delivery body: typed and borrowed from the event, so rendering costs one
/// serialization and no intermediate JSON tree.
#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    event_type: EventType,
    timestamp: String,
    data: Data<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Data<'a> {
    event_id: &'a str,
    source: &'a str,
    occurred_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    direction: Option<Direction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    folder: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    producer_event_id: Option<&'a str>,
    matched_filters: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    flags: Option<&'a [Flag]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    flagged_event_id: Option<&'a str>,
    #[serde(flatten)]
    view: View<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    activity: Option<ActivityView<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_message: Option<RawRef<'a>>,
}

/// Who did what in the mailbox store. `full` shows it all; `anonymized` replaces the
/// users with pseudonyms; `metadata` keeps their domains; neither shows the client's
/// address nor a configuration change's arguments (they can name people).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ActivityView<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_domain: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_user: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    admin_session: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_ip: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stage: Option<DeleteStage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<FolderAction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_folder: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    imap_flags: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    change: Option<ConfigChange>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid_validity: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    reconciled: bool,
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
        service: a.service.as_deref(),
        remote_ip: a.remote_ip.as_deref().filter(|_| full),
        // A Dovecot session id encodes the client's address.
        session: a.session.as_deref().filter(|_| full),
        stage: a.stage,
        action: a.action,
        previous_folder: a.previous_folder.as_deref(),
        imap_flags: &a.imap_flags,
        change: a.change.as_ref().map(|c| ConfigChange {
            detail: c.detail.clone().filter(|_| full),
            ..c.clone()
        }),
        uid: a.uid,
        uid_validity: a.uid_validity,
        reconciled: a.reconciled,
    }
}

/// Where to fetch the archived raw message, and how to check it is the one.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RawRef<'a> {
    #[serde(flatten)]
    link: Link,
    sha256: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
}

/// What each payload mode shows of the people and the content.
#[derive(Serialize)]
#[serde(untagged)]
enum View<'a> {
    #[serde(rename_all = "camelCase")]
    Full {
        mailbox: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        message_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        from: Option<&'a str>,
        to: &'a [String],
        cc: &'a [String],
        #[serde(skip_serializing_if = "Option::is_none")]
        subject: Option<&'a str>,
        attachments: &'a [Attachment],
    },
    #[serde(rename_all = "camelCase")]
    Anonymized {
        mailbox: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        from: Option<String>,
        to: Vec<String>,
        cc: Vec<String>,
        attachments: Vec<Unnamed<'a>>,
    },
    #[serde(rename_all = "camelCase")]
    Metadata {
        #[serde(skip_serializing_if = "Option::is_none")]
        mailbox_domain: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        sender_domain: Option<&'a str>,
        recipient_domains: Vec<&'a str>,
        recipient_count: usize,
        attachments: Vec<Unnamed<'a>>,
    },
}

/// An attachment without its name (names can identify people and deals).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Unnamed<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<&'a str>,
}

fn unnamed(event: &MailboxEvent) -> Vec<Unnamed<'_>> {
    event
        .attachments
        .iter()
        .map(|a| Unnamed {
            content_type: a.content_type.as_deref(),
            size: a.size,
            sha256: a.sha256.as_deref(),
        })
        .collect()
}

pub fn render(event: &MailboxEvent, matched_filters: &[String], cfg: &PayloadConfig) -> Vec<u8> {
    let anon = |a: &str| {
        format!(
            "anon-{}@{}",
            pseudonym(&cfg.pseudonym_key, a),
            domain_of(a).unwrap_or("invalid")
        )
    };
    let view = match cfg.mode {
        PayloadMode::Full => View::Full {
            mailbox: &event.mailbox,
            message_id: event.message_id.as_deref(),
            from: event.from.as_deref(),
            to: &event.to,
            cc: &event.cc,
            subject: event.subject.as_deref(),
            attachments: &event.attachments,
        },
        PayloadMode::Anonymized => View::Anonymized {
            mailbox: anon(&event.mailbox),
            from: event.from.as_deref().map(anon),
            to: event.to.iter().map(|a| anon(a)).collect(),
            cc: event.cc.iter().map(|a| anon(a)).collect(),
            attachments: unnamed(event),
        },
        PayloadMode::Metadata => {
            let mut domains: Vec<&str> = event.to.iter().chain(&event.cc).filter_map(|a| domain_of(a)).collect();
            domains.sort_unstable();
            domains.dedup();
            View::Metadata {
                mailbox_domain: domain_of(&event.mailbox),
                sender_domain: event.from.as_deref().and_then(domain_of),
                recipient_domains: domains,
                recipient_count: event.to.len() + event.cc.len(),
                attachments: unnamed(event),
            }
        }
    };
    let body = Body {
        event_type: event.event_type,
        timestamp: event.occurred_at.to_string(),
        data: Data {
            event_id: &event.id,
            source: event.source.as_str(),
            occurred_at: event.occurred_at.to_string(),
            direction: event.direction,
            folder: event.folder.as_deref(),
            size: event.size,
            // Dovecot's ids name the user and folder (and a batch's, the session).
            producer_event_id: event
                .producer_event_id
                .as_deref()
                .filter(|_| cfg.mode == PayloadMode::Full || event.source != crate::event::Source::Dovecot),
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
                (Some(links), Some(sha256)) => Some(RawRef {
                    link: links.link(sha256, jiff::Timestamp::now()),
                    sha256,
                    size: event.size,
                }),
                _ => None,
            },
        },
    };
    if cfg.redact.is_empty() {
        return serde_json::to_vec(&body).unwrap_or_default();
    }
    // Redaction is by field name: go through a JSON tree only when there is some.
    let mut tree = serde_json::to_value(&body).unwrap_or(Value::Null);
    if let Some(data) = tree.get_mut("data").and_then(Value::as_object_mut) {
        for field in &cfg.redact {
            data.remove(field);
        }
    }
    serde_json::to_vec(&tree).unwrap_or_default()
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
}
