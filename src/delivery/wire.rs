//! What goes on the wire for one request: the body and headers of a delivery in the
//! subscription's format (Standard Webhooks JSON, or CloudEvents 1.0 in binary,
//! structured or batched content mode), encrypted to the receiver's key when it asks.
//! Pure: `attempt` signs and sends what this builds.

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::encryption::EncryptionKeys;
use super::payload::{self, PayloadConfig};
use crate::event::MailboxEvent;
use crate::route::Ceiling;

/// Where the published JSON Schemas of `data` live (`schemas/v1/` in the repository).
pub const SCHEMA_BASE: &str = "https://mailhook.io/schemas/v1";
/// The prefix of every CloudEvents `type` mailhook sends.
pub const TYPE_PREFIX: &str = "io.mailhook.";

/// The shape of a subscription's deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    StandardWebhooks,
    /// CloudEvents; `structured` for one event per request (batches always are).
    CloudEvents {
        structured: bool,
    },
}

/// Everything the wire shape depends on, from the subscription.
#[derive(Debug, Clone)]
pub struct WireConfig {
    pub format: Format,
    /// Encrypts what is sent (`payload.encryption`).
    pub encryption: Option<EncryptionKeys>,
    /// Names this operator in a CloudEvent's `source` (`/mailhook/<instance>/<source>`).
    pub instance: std::sync::Arc<str>,
    /// Every request carries an array of events (`delivery.batch`), even of one.
    pub batched: bool,
}

/// One event of a request.
pub struct Item<'a> {
    pub event: &'a MailboxEvent,
    pub matched_filters: &'a [String],
    /// Its `webhook-id` (`attempt::webhook_id`): stable per event and subscription.
    pub webhook_id: String,
    /// The most the MailboxGrants covering this event let it show, whatever the
    /// subscription's own payload settings ask for.
    pub ceiling: Ceiling,
}

/// A request ready to sign and send.
#[derive(Debug)]
pub struct Request {
    /// `webhook-id` of the request: the event's, or a batch's (derived from its events').
    pub id: String,
    pub content_type: &'static str,
    /// Headers besides the Standard Webhooks ones and `content-type`.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("cannot encrypt the payload")]
    Encrypt(#[source] super::encryption::EncryptError),
    #[error("a request needs at least one event")]
    Empty,
}

/// The request carrying `items` (one, unless batched).
pub fn request(cfg: &WireConfig, payload: &PayloadConfig, items: &[Item<'_>]) -> Result<Request, WireError> {
    build(cfg, payload, items, usize::MAX).map(|(request, _)| request)
}

/// The request carrying the first of `items` that fit in `max_bytes` (`delivery.batch`;
/// at least one, and only a batch carries more), and how many it carries. Each event is
/// rendered once, whether it fits or not.
pub fn build(
    cfg: &WireConfig,
    payload: &PayloadConfig,
    items: &[Item<'_>],
    max_bytes: usize,
) -> Result<(Request, usize), WireError> {
    let items = if cfg.batched {
        items
    } else {
        items.get(..1).unwrap_or_default()
    };
    let encrypt = |plain: &[u8]| match &cfg.encryption {
        Some(keys) => keys.encrypt(plain).map(Some).map_err(WireError::Encrypt),
        None => Ok(None),
    };
    // Each event's share of the body: its Standard Webhooks body, or its structured event.
    let mut pieces: Vec<Vec<u8>> = Vec::with_capacity(items.len());
    // An unbatched CloudEvent: its attributes, data and encrypted data (binary mode needs
    // them apart).
    let mut single = None;
    let mut size = 0;
    for item in items {
        let payload = payload.capped(item.ceiling);
        let payload = payload.as_ref();
        let piece = match cfg.format {
            Format::StandardWebhooks => payload::render(item.event, item.matched_filters, payload),
            Format::CloudEvents { .. } => {
                let data = payload::render_data(item.event, item.matched_filters, payload);
                let sealed = encrypt(&data)?;
                let attrs = attributes(cfg, payload, item, sealed.is_some());
                if !cfg.batched {
                    single = Some((attrs, data, sealed));
                    break;
                }
                structured_json(&attrs, &data, sealed.as_deref())
            }
        };
        // A Standard Webhooks body is encrypted whole, afterwards: count its base64 growth.
        let grows = cfg.format == Format::StandardWebhooks && cfg.encryption.is_some();
        let share = if grows { piece.len() * 4 / 3 } else { piece.len() } + 1;
        if !pieces.is_empty() && size + share > max_bytes {
            break;
        }
        size += share;
        pieces.push(piece);
    }
    let kept = if single.is_some() { 1 } else { pieces.len() };
    let sent = items.get(..kept).unwrap_or_default();
    let first = sent.first().ok_or(WireError::Empty)?;
    let id = if cfg.batched {
        batch_id(sent.iter().map(|i| i.webhook_id.as_str()))
    } else {
        first.webhook_id.clone()
    };
    let mut headers = Vec::new();
    if cfg.batched {
        headers.push(("mailhook-batch-size".to_string(), kept.to_string()));
    }
    // The audit log index of each event's acceptance, in the order of the body, when every
    // one is known (an event committed moments ago may not be yet).
    let indexes: Option<Vec<String>> = sent
        .iter()
        .map(|i| i.event.log_index.get().map(|n| n.to_string()))
        .collect();
    if let Some(indexes) = indexes {
        headers.push(("mailhook-log-index".to_string(), indexes.join(",")));
    }
    let request = match (cfg.format, single) {
        (_, Some((attrs, data, sealed))) => {
            let structured = cfg.format == Format::CloudEvents { structured: true };
            one_event(id, headers, &attrs, data, sealed, structured)
        }
        (Format::StandardWebhooks, None) => {
            let plain = if cfg.batched {
                json_array(&pieces)
            } else {
                pieces.concat()
            };
            let sealed = encrypt(&plain)?;
            sealed_or_plain(id, headers, sealed, plain)
        }
        (Format::CloudEvents { .. }, None) => Request {
            id,
            content_type: "application/cloudevents-batch+json",
            headers,
            body: json_array(&pieces),
        },
    };
    Ok((request, kept))
}

/// One CloudEvent: the whole event as JSON (structured), or its attributes as `ce-`
/// headers and its data as the body (binary).
fn one_event(
    id: String,
    mut headers: Vec<(String, String)>,
    attrs: &[(&'static str, String)],
    data: Vec<u8>,
    sealed: Option<String>,
    structured: bool,
) -> Request {
    if structured {
        return Request {
            id,
            content_type: "application/cloudevents+json; charset=utf-8",
            headers,
            body: structured_json(attrs, &data, sealed.as_deref()),
        };
    }
    for (name, value) in attrs {
        // The content type travels as `content-type` in binary mode.
        if *name != "datacontenttype" {
            headers.push((format!("ce-{name}"), header_value(value)));
        }
    }
    sealed_or_plain(id, headers, sealed, data)
}

/// A JWE body when the payload was encrypted, else the JSON itself.
fn sealed_or_plain(id: String, headers: Vec<(String, String)>, sealed: Option<String>, plain: Vec<u8>) -> Request {
    match sealed {
        Some(jwe) => Request {
            id,
            content_type: "application/jose",
            headers,
            body: jwe.into_bytes(),
        },
        None => Request {
            id,
            content_type: "application/json",
            headers,
            body: plain,
        },
    }
}

/// A batch's `webhook-id`: the same for the same events in the same order.
pub fn batch_id<'a>(ids: impl Iterator<Item = &'a str>) -> String {
    let mut hasher = Sha256::new();
    for id in ids {
        hasher.update(id.as_bytes());
        hasher.update(b"\n");
    }
    let digest = hasher.finalize();
    format!("msg_{}", crate::crypto::hex(digest.get(..16).unwrap_or_default()))
}

fn json_array(items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(items.iter().map(|b| b.len() + 1).sum::<usize>() + 2);
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item);
    }
    out.push(b']');
    out
}

/// The CloudEvents context attributes of one event, in the order they are sent.
/// Encrypted, the attributes that can name people (subject, filters, flags) are left out.
fn attributes(cfg: &WireConfig, payload: &PayloadConfig, item: &Item<'_>, sealed: bool) -> Vec<(&'static str, String)> {
    let event = item.event;
    let kind = event.event_type.as_str();
    let mut attrs = vec![
        ("specversion", "1.0".to_string()),
        ("id", item.webhook_id.clone()),
        (
            "source",
            format!("/mailhook/{}/{}", cfg.instance, event.source.as_str()),
        ),
        ("type", format!("{TYPE_PREFIX}{kind}")),
        ("time", event.occurred_at.to_string()),
        (
            "datacontenttype",
            if sealed { "application/jose" } else { "application/json" }.to_string(),
        ),
        (
            "dataschema",
            format!("{SCHEMA_BASE}/{}/{kind}.json", mode_name(payload)),
        ),
    ];
    // What the data hides (encrypted, or redacted), the attributes do not show either.
    let shown = |field: &str| !sealed && !payload.redact.iter().any(|r| r == field);
    if shown("mailbox")
        && let Some(subject) = payload::shown_mailbox(event, payload)
    {
        attrs.push(("subject", subject));
    }
    if shown("matchedFilters") && !item.matched_filters.is_empty() {
        attrs.push(("mailhookfilters", item.matched_filters.join(",")));
    }
    if shown("flags") && !event.flags.is_empty() {
        let names: Vec<&str> = event.flags.iter().map(|f| f.name.as_str()).collect();
        attrs.push(("mailhookflags", names.join(",")));
    }
    // Where to ask for the proof that the event was accepted (`mailhook audit prove`).
    if let Some(index) = event.log_index.get() {
        attrs.push(("mailhooklogindex", index.to_string()));
    }
    if let Some(note) = &event.dead_letter {
        use base64::Engine;
        // Knative's dead-letter extension attributes, which its tooling already reads.
        attrs.push(("knativeerrordest", note.endpoint.clone()));
        if let Some(status) = note.last_status {
            attrs.push(("knativeerrorcode", status.to_string()));
        }
        let why = note.last_error.as_deref().unwrap_or(&note.reason);
        attrs.push((
            "knativeerrordata",
            base64::engine::general_purpose::STANDARD.encode(why),
        ));
        attrs.push(("mailhookattempts", note.attempts.to_string()));
        attrs.push(("mailhookdeadreason", note.reason.clone()));
        attrs.push(("mailhookorigin", note.subscription.clone()));
    }
    attrs
}

pub fn mode_name(payload: &PayloadConfig) -> &'static str {
    payload.mode.as_str()
}

/// One event in the structured (JSON) format: its attributes and `data`.
pub fn structured_json(attrs: &[(&'static str, String)], data: &[u8], sealed: Option<&str>) -> Vec<u8> {
    struct Structured<'a> {
        attrs: &'a [(&'static str, String)],
        data: Option<&'a RawValue>,
        sealed: Option<&'a str>,
    }
    impl Serialize for Structured<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut map = s.serialize_map(Some(self.attrs.len() + 1))?;
            for (name, value) in self.attrs {
                map.serialize_entry(name, value)?;
            }
            match (self.sealed, self.data) {
                (Some(jwe), _) => map.serialize_entry("data", jwe)?,
                (None, Some(raw)) => map.serialize_entry("data", raw)?,
                (None, None) => {}
            }
            map.end()
        }
    }
    let data = serde_json::from_slice::<&RawValue>(data).ok();
    serde_json::to_vec(&Structured { attrs, data, sealed }).unwrap_or_default()
}

/// A header value as the CloudEvents HTTP binding wants it: space, `"`, `%` and
/// everything outside printable ASCII percent-encoded (UTF-8).
pub fn header_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if (0x21..=0x7e).contains(&byte) && byte != b'"' && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A CloudEvent mailhook itself sends (the endpoint verification challenge): never
/// batched nor encrypted, its data has no mail in it.
pub fn operator_event(
    cfg: &WireConfig,
    id: String,
    kind: &str,
    time: jiff::Timestamp,
    data: &[u8],
    structured: bool,
) -> Request {
    let attrs = [
        ("specversion", "1.0".to_string()),
        ("id", id.clone()),
        ("source", format!("/mailhook/{}/operator", cfg.instance)),
        ("type", format!("{TYPE_PREFIX}{kind}")),
        ("time", time.to_string()),
        ("datacontenttype", "application/json".to_string()),
        ("dataschema", format!("{SCHEMA_BASE}/{kind}.json")),
    ];
    one_event(id, Vec::new(), &attrs, data.to_vec(), None, structured)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::PayloadMode;
    use serde_json::{Value, json};

    fn event() -> MailboxEvent {
        serde_json::from_value(json!({
            "id": "evt_1", "type": "message.received", "occurredAt": "2026-01-01T00:00:00Z",
            "receivedAt": "2026-01-01T00:00:00Z", "source": "smtp", "mailbox": "jürgen@bücher.example",
            "from": "bob@partner.org", "to": ["jürgen@bücher.example"], "subject": "Fusion – vertraulich",
            "attachments": [{"name": "plan.pdf", "contentType": "application/pdf", "size": 10}]
        }))
        .expect("event")
    }

    fn payload(mode: PayloadMode) -> PayloadConfig {
        PayloadConfig {
            mode,
            redact: vec![],
            pseudonym_key: b"key".to_vec(),
            raw_links: None,
            subscription: "sub".into(),
        }
    }

    fn wire(format: Format, batched: bool) -> WireConfig {
        WireConfig {
            format,
            encryption: None,
            instance: "mailhook-system/mailhook".into(),
            batched,
        }
    }

    fn keys() -> EncryptionKeys {
        // A P-256 public key (the curve's generator point): enough to encrypt to.
        let jwk = json!({"kty": "EC", "crv": "P-256",
            "x": "axfR8uEsQkf4vOblY6RA8ncDfYEt6zOg9KE5RdiYwpY",
            "y": "T-NC4v4af5uO5-tKfA-eFivOM1drMV7Oy7ZAaDe_UfU"});
        let data = [("2026-12.jwk".to_string(), serde_json::to_vec(&jwk).expect("json"))].into();
        EncryptionKeys::from_secret_data(&data).expect("keys")
    }

    fn items<'a>(event: &'a MailboxEvent, filters: &'a [String]) -> Vec<Item<'a>> {
        vec![Item {
            event,
            matched_filters: filters,
            webhook_id: "msg_1".into(),
            ceiling: Ceiling::NONE,
        }]
    }

    fn header<'a>(r: &'a Request, name: &str) -> Option<&'a str> {
        r.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn binary_mode_puts_attributes_in_percent_encoded_headers_and_data_in_the_body() {
        let (e, filters) = (event(), vec!["legal".to_string(), "finance".to_string()]);
        let r = request(
            &wire(Format::CloudEvents { structured: false }, false),
            &payload(PayloadMode::Full),
            &items(&e, &filters),
        )
        .expect("request");
        assert_eq!(r.id, "msg_1");
        assert_eq!(r.content_type, "application/json");
        assert_eq!(header(&r, "ce-specversion"), Some("1.0"));
        assert_eq!(
            header(&r, "ce-id"),
            Some("msg_1"),
            "the CloudEvents id is the webhook-id"
        );
        assert_eq!(header(&r, "ce-type"), Some("io.mailhook.message.received"));
        assert_eq!(header(&r, "ce-source"), Some("/mailhook/mailhook-system/mailhook/smtp"));
        assert_eq!(header(&r, "ce-subject"), Some("j%C3%BCrgen@b%C3%BCcher.example"));
        assert_eq!(header(&r, "ce-mailhookfilters"), Some("legal,finance"));
        assert_eq!(
            header(&r, "ce-dataschema"),
            Some("https://mailhook.io/schemas/v1/full/message.received.json")
        );
        assert_eq!(header(&r, "ce-datacontenttype"), None, "it travels as content-type");
        let data: Value = serde_json::from_slice(&r.body).expect("json");
        assert_eq!(data["subject"], "Fusion – vertraulich");
        assert_eq!(data["eventId"], "evt_1");
    }

    #[test]
    fn structured_mode_is_one_json_event_and_metadata_mode_has_no_subject() {
        let e = event();
        let r = request(
            &wire(Format::CloudEvents { structured: true }, false),
            &payload(PayloadMode::Metadata),
            &items(&e, &[]),
        )
        .expect("request");
        assert_eq!(r.content_type, "application/cloudevents+json; charset=utf-8");
        let ce: Value = serde_json::from_slice(&r.body).expect("json");
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["datacontenttype"], "application/json");
        assert_eq!(ce["time"], "2026-01-01T00:00:00Z");
        assert_eq!(ce["data"]["senderDomain"], "partner.org");
        assert!(ce.get("subject").is_none(), "metadata mode shows no address: {ce}");
        assert!(ce.get("mailhookfilters").is_none());
        assert!(!String::from_utf8_lossy(&r.body).contains("jürgen"));
    }

    #[test]
    fn encrypted_requests_show_no_mail_in_clear() {
        let e = event();
        let filters = vec!["legal".to_string()];
        for format in [
            Format::StandardWebhooks,
            Format::CloudEvents { structured: false },
            Format::CloudEvents { structured: true },
        ] {
            for batched in [false, true] {
                let mut cfg = wire(format, batched);
                cfg.encryption = Some(keys());
                let r = request(&cfg, &payload(PayloadMode::Full), &items(&e, &filters)).expect("request");
                let mut seen = String::from_utf8_lossy(&r.body).into_owned();
                for (name, value) in &r.headers {
                    seen.push_str(&format!("\n{name}: {value}"));
                }
                for secret in ["jürgen", "j%C3%BCrgen", "bücher", "Fusion", "plan.pdf", "bob@", "legal"] {
                    assert!(
                        !seen.contains(secret),
                        "{format:?} batched={batched} shows {secret}: {seen}"
                    );
                }
            }
        }
        let mut cfg = wire(Format::StandardWebhooks, false);
        cfg.encryption = Some(keys());
        let r = request(&cfg, &payload(PayloadMode::Full), &items(&e, &filters)).expect("request");
        assert_eq!(r.content_type, "application/jose");
        assert_eq!(
            r.body.iter().filter(|b| **b == b'.').count(),
            4,
            "JWE compact: five parts"
        );
    }

    #[test]
    fn batches_are_arrays_with_an_id_of_their_events() {
        let (a, mut b) = (event(), event());
        b.id = "evt_2".into();
        let batch = vec![
            Item {
                event: &a,
                matched_filters: &[],
                webhook_id: "msg_a".into(),
                ceiling: Ceiling::NONE,
            },
            Item {
                event: &b,
                matched_filters: &[],
                webhook_id: "msg_b".into(),
                ceiling: Ceiling::NONE,
            },
        ];
        let r = request(
            &wire(Format::StandardWebhooks, true),
            &payload(PayloadMode::Full),
            &batch,
        )
        .expect("request");
        let bodies: Vec<Value> = serde_json::from_slice(&r.body).expect("array");
        assert_eq!(bodies.len(), 2);
        assert_eq!(bodies[1]["data"]["eventId"], "evt_2");
        assert_eq!(header(&r, "mailhook-batch-size"), Some("2"));
        assert_eq!(r.id, batch_id(["msg_a", "msg_b"].into_iter()));
        assert_ne!(r.id, batch_id(["msg_b", "msg_a"].into_iter()));

        let r = request(
            &wire(Format::CloudEvents { structured: false }, true),
            &payload(PayloadMode::Full),
            &batch,
        )
        .expect("request");
        assert_eq!(r.content_type, "application/cloudevents-batch+json");
        let events: Vec<Value> = serde_json::from_slice(&r.body).expect("array");
        assert_eq!(events[0]["id"], "msg_a");
        assert_eq!(events[1]["data"]["eventId"], "evt_2");
    }

    #[test]
    fn a_dead_letter_copy_says_why_in_knative_attributes_and_shows_the_first_event_id() {
        let mut e = event();
        e.id = "evt_copy".into();
        e.dead_letter = Some(Box::new(crate::event::DeadLetterNote {
            event_id: "evt_1".into(),
            subscription: "mail/siem".into(),
            endpoint: "https://siem.example.com/hooks".into(),
            webhook_id: "msg_first".into(),
            reason: "retries exhausted after 3 attempts; last error: HTTP 500".into(),
            attempts: 3,
            last_status: Some(500),
            last_error: Some("HTTP 500".into()),
            dead_lettered_at: "2026-01-01T01:00:00Z".parse().expect("time"),
            sink_uri: None,
        }));
        let r = request(
            &wire(Format::CloudEvents { structured: false }, false),
            &payload(PayloadMode::Full),
            &items(&e, &[]),
        )
        .expect("request");
        assert_eq!(header(&r, "ce-knativeerrorcode"), Some("500"));
        assert_eq!(
            header(&r, "ce-knativeerrordest"),
            Some("https://siem.example.com/hooks")
        );
        assert_eq!(header(&r, "ce-knativeerrordata"), Some("SFRUUCA1MDA="));
        assert_eq!(header(&r, "ce-mailhookattempts"), Some("3"));
        let data: Value = serde_json::from_slice(&r.body).expect("json");
        assert_eq!(data["eventId"], "evt_1");

        let r = request(
            &wire(Format::StandardWebhooks, false),
            &payload(PayloadMode::Full),
            &items(&e, &[]),
        )
        .expect("request");
        let body: Value = serde_json::from_slice(&r.body).expect("json");
        assert_eq!(body["deadLetter"]["lastStatus"], 500);
        assert_eq!(body["deadLetter"]["webhookId"], "msg_first");
        assert_eq!(body["data"]["eventId"], "evt_1");
    }

    #[test]
    fn what_the_data_redacts_the_attributes_do_not_show() {
        let (e, filters) = (event(), vec!["legal".to_string()]);
        let mut p = payload(PayloadMode::Full);
        p.redact = vec!["mailbox".into(), "matchedFilters".into()];
        let r = request(
            &wire(Format::CloudEvents { structured: false }, false),
            &p,
            &items(&e, &filters),
        )
        .expect("request");
        assert_eq!(header(&r, "ce-subject"), None);
        assert_eq!(header(&r, "ce-mailhookfilters"), None);
        assert_eq!(header(&r, "ce-type"), Some("io.mailhook.message.received"));
    }

    #[test]
    fn header_values_encode_what_http_headers_cannot_carry() {
        assert_eq!(header_value("plain-ASCII_1.0"), "plain-ASCII_1.0");
        assert_eq!(header_value("a b\"c%d"), "a%20b%22c%25d");
        assert_eq!(header_value("ü"), "%C3%BC");
        assert_eq!(header_value("\r\n"), "%0D%0A");
    }
}
