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

/// Where the published JSON Schemas of `data` live (`schemas/v1/` in the repository).
pub const SCHEMA_BASE: &str = "https://mailhook.io/schemas/v1";
/// The prefix of every CloudEvents `type` mailhook sends.
pub const TYPE_PREFIX: &str = "io.mailhook.";

/// The shape of a subscription's deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    StandardWebhooks,
    /// CloudEvents; `structured` for one event per request (batches always are).
    CloudEvents { structured: bool },
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
    let first = items.first().ok_or(WireError::Empty)?;
    let id = if items.len() == 1 && !cfg.batched {
        first.webhook_id.clone()
    } else {
        batch_id(items.iter().map(|i| i.webhook_id.as_str()))
    };
    let mut headers = Vec::new();
    if cfg.batched {
        headers.push(("mailhook-batch-size".to_string(), items.len().to_string()));
    }
    let encrypt = |plain: &[u8]| match &cfg.encryption {
        Some(keys) => keys.encrypt(plain).map(Some).map_err(WireError::Encrypt),
        None => Ok(None),
    };
    match cfg.format {
        Format::StandardWebhooks => {
            let bodies: Vec<Vec<u8>> = items
                .iter()
                .map(|i| payload::render(i.event, i.matched_filters, payload))
                .collect();
            let plain = if cfg.batched { json_array(&bodies) } else { bodies.concat() };
            Ok(match encrypt(&plain)? {
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
            })
        }
        Format::CloudEvents { structured } => {
            let mut events = Vec::with_capacity(items.len());
            for item in items {
                let data = payload::render_data(item.event, item.matched_filters, payload);
                let sealed = encrypt(&data)?;
                let attrs = attributes(cfg, payload, item, sealed.is_some());
                events.push((attrs, data, sealed));
            }
            if cfg.batched {
                let bodies: Vec<Vec<u8>> = events.iter().map(|(a, d, s)| structured_json(a, d, s.as_deref())).collect();
                return Ok(Request {
                    id,
                    content_type: "application/cloudevents-batch+json",
                    headers,
                    body: json_array(&bodies),
                });
            }
            let Some((attrs, data, sealed)) = events.pop() else {
                return Err(WireError::Empty);
            };
            if structured {
                return Ok(Request {
                    id,
                    content_type: "application/cloudevents+json; charset=utf-8",
                    headers,
                    body: structured_json(&attrs, &data, sealed.as_deref()),
                });
            }
            for (name, value) in &attrs {
                // The content type travels as `content-type` in binary mode.
                if *name != "datacontenttype" {
                    headers.push((format!("ce-{name}"), header_value(value)));
                }
            }
            Ok(match sealed {
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
                    body: data,
                },
            })
        }
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
        ("source", format!("/mailhook/{}/{}", cfg.instance, event.source.as_str())),
        ("type", format!("{TYPE_PREFIX}{kind}")),
        ("time", event.occurred_at.to_string()),
        (
            "datacontenttype",
            if sealed { "application/jose" } else { "application/json" }.to_string(),
        ),
        ("dataschema", format!("{SCHEMA_BASE}/{}/{kind}.json", mode_name(payload))),
    ];
    if !sealed {
        if let Some(subject) = payload::shown_mailbox(event, payload) {
            attrs.push(("subject", subject));
        }
        if !item.matched_filters.is_empty() {
            attrs.push(("mailhookfilters", item.matched_filters.join(",")));
        }
        if !event.flags.is_empty() {
            let names: Vec<&str> = event.flags.iter().map(|f| f.name.as_str()).collect();
            attrs.push(("mailhookflags", names.join(",")));
        }
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
        attrs.push(("mailhookdeadsubscription", note.subscription.clone()));
    }
    attrs
}

pub fn mode_name(payload: &PayloadConfig) -> &'static str {
    match payload.mode {
        crate::api::PayloadMode::Full => "full",
        crate::api::PayloadMode::Metadata => "metadata",
        crate::api::PayloadMode::Anonymized => "anonymized",
    }
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
pub fn operator_event(cfg: &WireConfig, id: String, kind: &str, time: jiff::Timestamp, data: &[u8], structured: bool) -> Request {
    let attrs = vec![
        ("specversion", "1.0".to_string()),
        ("id", id.clone()),
        ("source", format!("/mailhook/{}/operator", cfg.instance)),
        ("type", format!("{TYPE_PREFIX}{kind}")),
        ("time", time.to_string()),
        ("datacontenttype", "application/json".to_string()),
        ("dataschema", format!("{SCHEMA_BASE}/{kind}.json")),
    ];
    if structured {
        return Request {
            id,
            content_type: "application/cloudevents+json; charset=utf-8",
            headers: Vec::new(),
            body: structured_json(&attrs, data, None),
        };
    }
    let headers = attrs
        .iter()
        .filter(|(name, _)| *name != "datacontenttype")
        .map(|(name, value)| (format!("ce-{name}"), header_value(value)))
        .collect();
    Request {
        id,
        content_type: "application/json",
        headers,
        body: data.to_vec(),
    }
}
