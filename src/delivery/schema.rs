//! The published contract of deliveries: a JSON Schema (2020-12) of every event type's
//! `data` in each payload mode, generated from the very types `payload` serializes, and an
//! OpenAPI 3.1 document whose `webhooks` describe every request (headers, formats,
//! encryption, batches) for receivers to generate code from. `mailhook schemagen` writes
//! them to `schemas/v1/`; a test fails when the checked-in files drift from the types.

use schemars::JsonSchema;
use serde_json::{Map, Value, json};

use super::payload::{AnonymizedView, Data, DeadLetterView, FullView, MetadataView, UNREDACTABLE};
use super::verification::ChallengeData;
use super::wire::SCHEMA_BASE;
use crate::api::EventType;

/// The payload modes, as schema paths name them.
pub const MODES: [&str; 3] = ["full", "metadata", "anonymized"];

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot write the schema as JSON")]
    Json(#[from] serde_json::Error),
    #[error("two different schemas are both named {0:?}")]
    Clash(String),
}

fn root<T: JsonSchema>() -> Result<Value, SchemaError> {
    // What is sent: a field skipped when empty is not required.
    let generator = schemars::generate::SchemaSettings::draft2020_12()
        .for_serialize()
        .into_generator();
    Ok(serde_json::to_value(generator.into_root_schema_for::<T>())?)
}

/// The data schema of one mode, before it is named for an event type.
fn mode_data(mode: &str) -> Result<Value, SchemaError> {
    let mut schema = match mode {
        "full" => root::<Data<'static, FullView<'static>>>()?,
        "metadata" => root::<Data<'static, MetadataView<'static>>>()?,
        _ => root::<Data<'static, AnonymizedView<'static>>>()?,
    };
    if let Some(obj) = schema.as_object_mut() {
        // Every other field may be removed by `payload.redact`.
        obj.insert("required".into(), json!(UNREDACTABLE));
        // A field renamed or added without regenerating shows up as a validation error.
        obj.insert("additionalProperties".into(), json!(false));
    }
    Ok(schema)
}

fn describe(kind: EventType) -> &'static str {
    match kind {
        EventType::MessageReceived => "A message arrived in a mailbox.",
        EventType::MessageSent => "A mailbox sent a message to an external recipient.",
        EventType::MessageInternal => "A message travelled between two internal mailboxes.",
        EventType::MessageDeleted => {
            "A message was deleted: activity.stage is soft (marked \\Deleted or moved to the trash) or hard (expunged)."
        }
        EventType::MessageMoved => "A message moved from activity.previousFolder to folder.",
        EventType::MessageFlagged => "IMAP flags or keywords (activity.imapFlags) were set on a message.",
        EventType::MessageUnflagged => "IMAP flags or keywords (activity.imapFlags) were removed from a message.",
        EventType::FolderChanged => {
            "A folder was created, renamed, deleted, subscribed or unsubscribed (activity.action)."
        }
        EventType::MailboxConfigChanged => "Sieve scripts, ACLs or metadata of a mailbox changed (activity.change).",
        EventType::ComplianceFlagged => "MailboxFilters with a flag matched a message (flags, flaggedEventId).",
        EventType::MessageAccessed => {
            "A message's body was read (IMAP FETCH including BODY.PEEK and re-reads, POP3 RETR), by the owner, a delegate or a master/admin session (activity.access, activity.authUser)."
        }
        EventType::MailboxBulkAccess => {
            "One session read more messages than the bulk threshold within the window: one event with the count (activity.bulk) instead of one per message."
        }
        EventType::MailboxLogin => {
            "A login succeeded or failed (activity.login); repeated failures of one user from one address are one event (activity.login.attempts)."
        }
    }
}

fn named(mut schema: Value, id: String, title: String, description: &str) -> Value {
    if let Some(obj) = schema.as_object_mut() {
        obj.insert("$id".into(), json!(id));
        obj.insert("title".into(), json!(title));
        obj.insert("description".into(), json!(description));
    }
    // serde_json keeps keys sorted: the files are stable byte for byte.
    schema
}

/// Every file of `schemas/v1/`, by path below it, as pretty JSON with a final newline.
pub fn files() -> Result<Vec<(String, String)>, SchemaError> {
    let mut out = Vec::new();
    let mut components = Map::new();
    for mode in MODES {
        let data = mode_data(mode)?;
        for kind in EventType::ALL {
            let path = format!("{mode}/{kind}.json");
            let schema = named(
                data.clone(),
                format!("{SCHEMA_BASE}/{path}"),
                format!("data of {kind} ({mode} payloads)"),
                describe(kind),
            );
            out.push((path, schema));
        }
        hoist(&data, &format!("{mode}.Data"), &mut components)?;
    }
    let challenge = root::<ChallengeData<'static>>()?;
    let path = "endpoint.verification.json".to_string();
    let description = "Sent before the first delivery when endpoint.verify is set: answer 2xx with {\"challenge\": <data.challenge>}.";
    out.push((
        path.clone(),
        named(
            challenge.clone(),
            format!("{SCHEMA_BASE}/{path}"),
            "data of endpoint.verification".into(),
            description,
        ),
    ));
    hoist(&challenge, "EndpointVerificationData", &mut components)?;
    hoist(&root::<DeadLetterView<'static>>()?, "DeadLetter", &mut components)?;
    out.push(("openapi.json".into(), openapi(components)));
    out.into_iter()
        .map(|(path, value)| Ok((path, format!("{}\n", serde_json::to_string_pretty(&value)?))))
        .collect()
}

/// Moves a root schema and its `$defs` into OpenAPI components (refs rewritten: in an
/// OpenAPI document `#/...` points at the document's root).
fn hoist(schema: &Value, name: &str, components: &mut Map<String, Value>) -> Result<(), SchemaError> {
    let mut schema = schema.clone();
    let defs = schema
        .as_object_mut()
        .and_then(|o| {
            o.remove("$schema");
            o.remove("$defs")
        })
        .and_then(|d| d.as_object().cloned())
        .unwrap_or_default();
    let mut put = |name: &str, mut value: Value| {
        rewrite_refs(&mut value);
        match components.get(name) {
            Some(existing) if *existing != value => Err(SchemaError::Clash(name.to_string())),
            _ => {
                components.insert(name.to_string(), value);
                Ok(())
            }
        }
    };
    for (def, value) in defs {
        put(&def, value)?;
    }
    put(name, schema)
}

fn rewrite_refs(value: &mut Value) {
    match value {
        Value::Object(obj) => {
            for (key, v) in obj.iter_mut() {
                if key == "$ref"
                    && let Some(r) = v.as_str()
                    && let Some(rest) = r.strip_prefix("#/$defs/")
                {
                    *v = json!(format!("#/components/schemas/{rest}"));
                } else {
                    rewrite_refs(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(rewrite_refs),
        _ => {}
    }
}

fn header(name: &str, required: bool, description: &str) -> Value {
    json!({"name": name, "in": "header", "required": required, "description": description, "schema": {"type": "string"}})
}

fn openapi(mut components: Map<String, Value>) -> Value {
    // Every event type's data has the same shape in a mode.
    let any_mode = json!({"anyOf": MODES.iter().map(|m| json!({"$ref": format!("#/components/schemas/{m}.Data")})).collect::<Vec<_>>()});
    components.insert(
        "CloudEventAttributes".into(),
        json!({
            "type": "object",
            "description": "CloudEvents 1.0 context attributes as mailhook sends them. Encrypted (payload.encryption), subject, mailhookfilters and mailhookflags are not sent and data is a JWE compact string (datacontenttype application/jose).",
            "required": ["specversion", "id", "source", "type", "time", "datacontenttype", "dataschema"],
            "properties": {
                "specversion": {"const": "1.0"},
                "id": {"type": "string", "description": "The same value as the webhook-id header: stable per event and subscription, so retries de-duplicate."},
                "source": {"type": "string", "description": "/mailhook/<instance>/<source>: the operator instance (--instance) and what reported the event (smtp, http, dovecot, router; operator for the verification challenge)."},
                "type": {"type": "string", "description": "io.mailhook.<event type>, e.g. io.mailhook.message.received."},
                "subject": {"type": "string", "description": "The mailbox, as the payload mode shows it (full: the address; anonymized: its pseudonym; absent in metadata mode)."},
                "time": {"type": "string", "format": "date-time"},
                "datacontenttype": {"enum": ["application/json", "application/jose"]},
                "dataschema": {"type": "string", "format": "uri", "description": "The JSON Schema of data (decrypted), e.g. https://mailhook.io/schemas/v1/full/message.received.json."},
                "mailhookfilters": {"type": "string", "description": "Comma-separated names of the MailboxFilters that matched."},
                "mailhookflags": {"type": "string", "description": "Comma-separated compliance flags (compliance.flagged)."},
                "knativeerrordest": {"type": "string", "description": "Dead-letter sink deliveries: the endpoint that refused the event."},
                "knativeerrorcode": {"type": "string", "description": "Dead-letter sink deliveries: its last HTTP status."},
                "knativeerrordata": {"type": "string", "description": "Dead-letter sink deliveries: base64 of the last error."},
                "mailhookattempts": {"type": "string", "description": "Dead-letter sink deliveries: attempts made."},
                "mailhookdeadreason": {"type": "string", "description": "Dead-letter sink deliveries: why the event was given up."},
                "mailhookorigin": {"type": "string", "description": "Dead-letter sink deliveries: namespace/name of the subscription it died in."}
            }
        }),
    );
    let mut webhooks = Map::new();
    let common = vec![
        header(
            "webhook-id",
            true,
            "Standard Webhooks message id: stable per event and subscription (a batch's is derived from its events' ids).",
        ),
        header("webhook-timestamp", true, "Unix seconds when the request was signed."),
        header(
            "webhook-signature",
            true,
            "Space-separated v1,<base64 HMAC-SHA256> and/or v1a,<base64 ed25519> over `{webhook-id}.{webhook-timestamp}.{body}`, the body as sent (encrypted or not).",
        ),
        header(
            "mailhook-batch-size",
            false,
            "delivery.batch: how many events the request carries.",
        ),
        header(
            "ce-specversion",
            false,
            "CloudEvents binary mode: 1.0; every other attribute as ce-<name>, values percent-encoded.",
        ),
        header("ce-id", false, "CloudEvents binary mode."),
        header("ce-source", false, "CloudEvents binary mode."),
        header("ce-type", false, "CloudEvents binary mode."),
        header("ce-time", false, "CloudEvents binary mode."),
        header(
            "ce-subject",
            false,
            "CloudEvents binary mode (not sent when encrypted).",
        ),
        header("ce-dataschema", false, "CloudEvents binary mode."),
    ];
    let mut kinds: Vec<(String, Value)> = EventType::ALL
        .iter()
        .map(|k| (k.as_str().to_string(), any_mode.clone()))
        .collect();
    kinds.push((
        "endpoint.verification".into(),
        json!({"$ref": "#/components/schemas/EndpointVerificationData"}),
    ));
    for (kind, data) in kinds {
        let body = json!({
            "type": "object",
            "required": ["type", "timestamp", "data"],
            "properties": {
                "type": {"const": kind},
                "timestamp": {"type": "string", "format": "date-time"},
                "data": data,
                "deadLetter": {"$ref": "#/components/schemas/DeadLetter"}
            },
            "additionalProperties": false
        });
        let event = json!({
            "allOf": [{"$ref": "#/components/schemas/CloudEventAttributes"}],
            "properties": {
                "type": {"const": format!("io.mailhook.{kind}")},
                "data": {"oneOf": [data, {"type": "string", "description": "JWE compact serialization of data (payload.encryption)."}]}
            }
        });
        let description = match EventType::ALL.iter().find(|k| k.as_str() == kind) {
            Some(k) => describe(*k),
            None => {
                "The endpoint verification challenge (endpoint.verify): answer 2xx with {\"challenge\": <data.challenge>}."
            }
        };
        webhooks.insert(
            kind.clone(),
            json!({"post": {
                "summary": kind,
                "description": format!("{description} The format follows the subscription: payload.format standardWebhooks (application/json: one body, or an array with delivery.batch; application/jose: the same encrypted as a JWE, ECDH-ES+A256KW with A256GCM, with payload.encryption) or cloudEvents (binary mode: ce- headers and data as the body; structured: application/cloudevents+json; batched: application/cloudevents-batch+json)."),
                "operationId": format!("deliver.{kind}"),
                "parameters": common,
                "requestBody": {"required": true, "content": {
                    "application/json": {"schema": {"oneOf": [body, {"type": "array", "items": body}, data]}},
                    "application/jose": {"schema": {"type": "string", "description": "JWE compact serialization (ECDH-ES+A256KW, A256GCM) of the application/json body, or of data in CloudEvents binary mode."}},
                    "application/cloudevents+json": {"schema": event},
                    "application/cloudevents-batch+json": {"schema": {"type": "array", "items": event}}
                }},
                "responses": {
                    "2XX": {"description": "Accepted: the delivery is complete (a batch as a whole)."},
                    "410": {"description": "Gone: stop deliveries; the endpoint is disabled and events are kept."},
                    "429": {"description": "Slow down: retried, honouring Retry-After up to delivery.maxRetryAfter (also 502, 503, 504)."},
                    "default": {"description": "Any other answer fails the attempt: retried on delivery.retrySchedule, then dead-lettered (and sent to delivery.deadLetterSink)."}
                }
            }}),
        );
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "mailhook deliveries",
            "version": "v1",
            "description": "Every request a mailhook WebhookSubscription makes to its endpoint. Signed with Standard Webhooks headers in every format."
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "paths": {},
        "webhooks": webhooks,
        "components": {"schemas": components}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/v1")
    }

    /// The checked-in schemas are what schemagen writes: fails when a delivered type
    /// changes without `cargo run -- schemagen`.
    #[test]
    fn checked_in_schemas_match_schemagen() {
        let files = files().expect("schemas");
        let mut expected: Vec<String> = files.iter().map(|(p, _)| p.clone()).collect();
        for (path, text) in &files {
            let on_disk = std::fs::read_to_string(dir().join(path)).unwrap_or_default();
            assert!(
                on_disk == *text,
                "schemas/v1/{path} is stale: run `cargo run -- schemagen`"
            );
        }
        let mut found = Vec::new();
        for entry in walk(&dir()) {
            found.push(entry);
        }
        expected.sort();
        found.sort();
        assert_eq!(
            found, expected,
            "schemas/v1 holds files schemagen does not write: run `cargo run -- schemagen`"
        );
    }

    fn walk(dir: &std::path::Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(dir) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        out
    }

    #[test]
    fn data_schemas_name_every_field_a_payload_carries() {
        let files = files().expect("schemas");
        let full = files
            .iter()
            .find(|(p, _)| p == "full/message.received.json")
            .map(|(_, t)| serde_json::from_str::<Value>(t).expect("json"))
            .expect("full/message.received.json");
        let properties = full["properties"].as_object().expect("properties");
        for field in [
            "eventId",
            "subject",
            "mailbox",
            "attachments",
            "activity",
            "matchedFilters",
            "rawMessage",
        ] {
            assert!(properties.contains_key(field), "{field} missing: {properties:?}");
        }
        assert_eq!(full["additionalProperties"], false);
        assert_eq!(full["$schema"], "https://json-schema.org/draft/2020-12/schema");
    }
}
