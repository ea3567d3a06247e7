//! What a subscription sends, from any event the sources could store and any public keys a
//! Secret could hold: every format, payload mode and batch shape renders without a panic,
//! unencrypted bodies are JSON, header values are what HTTP allows, and an encrypted
//! request never shows the subject in clear, and a `metadata` or `anonymized` request shows
//! no address, Message-ID or producer id of the event (`delivery::privacy`). Public keys
//! from Secrets are parsed too.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use mailhook::api::PayloadMode;
use mailhook::delivery::encryption::EncryptionKeys;
use mailhook::delivery::payload::PayloadConfig;
use mailhook::delivery::privacy;
use mailhook::delivery::wire::{self, Format, Item, WireConfig};
use mailhook::event::MailboxEvent;
use mailhook::route::Ceiling;

fuzz_target!(|data: &[u8]| {
    // Secret data: the first line names the key, the rest is its value.
    let text = String::from_utf8_lossy(data);
    let (name, value) = text.split_once('\n').unwrap_or(("key", &text));
    let secret: BTreeMap<String, Vec<u8>> = [(name.to_string(), value.as_bytes().to_vec())].into();
    let _ = EncryptionKeys::from_secret_data(&secret);

    let Ok(event) = serde_json::from_slice::<MailboxEvent>(data) else {
        return;
    };
    // The generator point of P-256: a valid public key to encrypt to.
    let jwk = br#"{"kty":"EC","crv":"P-256","x":"axfR8uEsQkf4vOblY6RA8ncDfYEt6zOg9KE5RdiYwpY","y":"T-NC4v4af5uO5-tKfA-eFivOM1drMV7Oy7ZAaDe_UfU"}"#;
    let keys = EncryptionKeys::from_secret_data(&[("k".to_string(), jwk.to_vec())].into()).ok();
    let filters = vec!["f".to_string()];
    // What a request may show in any mode (ids mailhook made, names the operator's users
    // chose): an identifier that is also one of these, or part of one, proves nothing.
    let shown = format!(
        "{} {} {} {} {}",
        event.id,
        serde_json::to_string(&event.flags).unwrap_or_default(),
        serde_json::to_string(&event.dead_letter).unwrap_or_default(),
        event.flagged_event_id.as_deref().unwrap_or_default(),
        event.occurred_at
    );
    // Identifiers that could not turn up by chance: an `@`, and a local part with a letter
    // no pseudonym (hex) has.
    let identifiers: Vec<&str> = privacy::identifiers(&event)
        .into_iter()
        .filter(|id| {
            id.split_once('@')
                .is_some_and(|(local, _)| local.chars().last().is_some_and(|c| !c.is_ascii_hexdigit()))
                && !shown.contains(id)
        })
        .collect();
    // Asked for by the subscription, or `full` lowered by the grant covering the event.
    let capped = |mode| Ceiling {
        mode,
        raw_links: false,
    };
    let ways = [
        (PayloadMode::Full, Ceiling::NONE),
        (PayloadMode::Metadata, Ceiling::NONE),
        (PayloadMode::Anonymized, Ceiling::NONE),
        (PayloadMode::Full, capped(PayloadMode::Metadata)),
        (PayloadMode::Full, capped(PayloadMode::Anonymized)),
    ];
    for (mode, ceiling) in ways {
        let payload = PayloadConfig {
            mode,
            redact: vec![],
            pseudonym_key: b"k".to_vec(),
            raw_links: None,
            subscription: "sub".into(),
        };
        for format in [
            Format::StandardWebhooks,
            Format::CloudEvents { structured: false },
            Format::CloudEvents { structured: true },
        ] {
            for (batched, encryption) in [(false, None), (true, None), (false, keys.clone())] {
                let cfg = WireConfig {
                    format,
                    encryption: encryption.clone(),
                    instance: "fuzz".into(),
                    batched,
                };
                let items = [Item {
                    event: &event,
                    matched_filters: &filters,
                    webhook_id: "msg_1".into(),
                    ceiling,
                }];
                let Ok(request) = wire::request(&cfg, &payload, &items) else {
                    continue;
                };
                for (header, value) in &request.headers {
                    assert!(
                        value.bytes().all(|b| (0x21..=0x7e).contains(&b)),
                        "{header}: {value:?} is not a valid header value"
                    );
                }
                if encryption.is_none() {
                    assert!(
                        serde_json::from_slice::<serde_json::Value>(&request.body).is_ok(),
                        "not JSON: {}",
                        String::from_utf8_lossy(&request.body)
                    );
                    if mode.at_most(ceiling.mode) != PayloadMode::Full {
                        assert_eq!(privacy::exposed(&identifiers, &request), None, "{mode:?} names someone");
                    }
                    continue;
                }
                // Encrypted, the body is a JWE: only base64url and dots, so a subject with any
                // other character would be a leak.
                if request.content_type == "application/jose" {
                    let leaked = event
                        .subject
                        .as_deref()
                        .filter(|s| s.chars().any(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(c))))
                        .is_some_and(|s| String::from_utf8_lossy(&request.body).contains(s));
                    assert!(!leaked, "subject in clear");
                }
            }
        }
    }
});
