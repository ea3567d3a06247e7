//! The JSON body of a delivery: `{"type", "timestamp", "data"}`, shaped by the
//! subscription's payload mode and redactions.

use serde_json::{Map, Value, json};

use crate::api::PayloadMode;
use crate::event::{MailboxEvent, domain_of};

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
}

pub fn render(event: &MailboxEvent, matched_filters: &[String], cfg: &PayloadConfig) -> Vec<u8> {
    let mut data = Map::new();
    let mut put = |k: &str, v: Value| {
        if !v.is_null() {
            data.insert(k.to_string(), v);
        }
    };
    put("eventId", json!(event.id));
    put("source", json!(event.source.as_str()));
    put("occurredAt", json!(event.occurred_at.to_string()));
    put("direction", json!(event.direction));
    put("folder", json!(event.folder));
    put("size", json!(event.size));
    put("producerEventId", json!(event.producer_event_id));
    put("matchedFilters", json!(matched_filters));
    if !event.flags.is_empty() {
        put("flags", json!(event.flags));
        put("flaggedEventId", json!(event.flagged_event_id));
    }
    match cfg.mode {
        PayloadMode::Full => {
            put("mailbox", json!(event.mailbox));
            put("messageId", json!(event.message_id));
            put("from", json!(event.from));
            put("to", json!(event.to));
            put("cc", json!(event.cc));
            put("subject", json!(event.subject));
            put("attachments", json!(event.attachments));
        }
        PayloadMode::Anonymized => {
            let anon = |a: &str| {
                format!(
                    "anon-{}@{}",
                    pseudonym(&cfg.pseudonym_key, a),
                    domain_of(a).unwrap_or("invalid")
                )
            };
            put("mailbox", json!(anon(&event.mailbox)));
            put("from", json!(event.from.as_deref().map(anon)));
            put("to", json!(event.to.iter().map(|a| anon(a)).collect::<Vec<_>>()));
            put("cc", json!(event.cc.iter().map(|a| anon(a)).collect::<Vec<_>>()));
            put("attachments", attachments_without_names(event));
        }
        PayloadMode::Metadata => {
            put("mailboxDomain", json!(domain_of(&event.mailbox)));
            put("senderDomain", json!(event.from.as_deref().and_then(domain_of)));
            let mut domains: Vec<&str> = event.to.iter().chain(&event.cc).filter_map(|a| domain_of(a)).collect();
            domains.sort_unstable();
            domains.dedup();
            put("recipientDomains", json!(domains));
            put("recipientCount", json!(event.to.len() + event.cc.len()));
            put("attachments", attachments_without_names(event));
        }
    }
    for field in &cfg.redact {
        data.remove(field);
    }
    let body = json!({
        "type": event.event_type,
        "timestamp": event.occurred_at.to_string(),
        "data": data,
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

fn attachments_without_names(event: &MailboxEvent) -> Value {
    json!(
        event
            .attachments
            .iter()
            .map(|a| json!({"contentType": a.content_type, "size": a.size, "sha256": a.sha256}))
            .collect::<Vec<_>>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
    }

    fn text(mode: PayloadMode) -> String {
        String::from_utf8(render(&event(), &["f".into()], &cfg(mode))).expect("utf8")
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
    fn redaction_removes_fields() {
        let mut c = cfg(PayloadMode::Full);
        c.redact = vec!["subject".into(), "cc".into()];
        let t = String::from_utf8(render(&event(), &[], &c)).expect("utf8");
        assert!(!t.contains("Merger plans") && !t.contains("carol@"));
    }
}
