//! Any bytes as what Dovecot posts (a push-notification batch, an exported event: a change,
//! a read, a login) and as what the reconciler and the ManageSieve client read (folder
//! names in modified UTF-7, message headers, answer lines): events and index changes or a
//! refusal naming the field, never a panic.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use mailhook::source::dovecot::reconcile::{decode_folder, encode_folder, parse_headers};
use mailhook::source::dovecot::exported::{Reported, read};
use mailhook::source::dovecot::held::hold;
use mailhook::source::dovecot::managesieve::tokenize;
use mailhook::source::dovecot::{Batch, DovecotConfig, Exported, map_batch, map_exported};
use mailhook::source::dovecot::index::{IndexedMessage, MessageKey};

fuzz_target!(|data: &[u8]| {
    let cfg = DovecotConfig {
        sent_folders: vec!["Sent".into()],
        trash_folders: vec!["Trash".into(), "Papierkorb".into()],
        internal_domains: vec!["example.test".into()],
        separator: Some('/'),
        own_master_user: Some("mailhook-admin".into()),
        sieve: None,
    };
    let now = jiff::Timestamp::UNIX_EPOCH;
    if let Ok(batch) = serde_json::from_slice::<Batch>(data) {
        // The index knows every odd UID, in every folder.
        let mut known: HashMap<MessageKey, IndexedMessage> = HashMap::new();
        let mut lookup = |k: &MessageKey| {
            (k.uid % 2 == 1).then(|| {
                known
                    .entry(k.clone())
                    .or_insert_with(|| IndexedMessage {
                        message_id: Some(format!("<{}@fuzz>", k.uid)),
                        ..Default::default()
                    })
                    .clone()
            })
        };
        let notifications = batch.events.len();
        match map_batch(batch, &mut lookup, &cfg, now) {
            Ok(mapped) => {
                assert!(mapped.events.len() <= notifications * 2, "at most two events per notification");
                for e in &mapped.events {
                    assert!(e.activity.is_some(), "every Dovecot event says who did it");
                    assert!(e.producer_event_id.as_deref().is_some_and(|p| !p.chars().any(char::is_control)));
                    assert_eq!(e.mailbox, e.mailbox.to_lowercase());
                }
            }
            Err(e) => assert!(!e.field.is_empty() && !e.problem.is_empty()),
        }
    }
    if let Ok(exported) = serde_json::from_slice::<Exported>(data) {
        // Reads, logins and changes: each bounded, held items keyed without control bytes.
        match read(&exported, &cfg, now) {
            Some(Reported::Held(item)) => {
                assert!(item.user.len() <= 320);
                assert!(!item.producer.chars().any(char::is_control));
                assert!(hold(&item).is_ok());
            }
            Some(Reported::Event { event, .. } | Reported::Sieve { event, .. }) => {
                assert!(event.activity.is_some());
                assert_eq!(event.mailbox, event.mailbox.to_lowercase());
            }
            None => {}
        }
        if let Some(e) = map_exported(exported, now) {
            assert!(e.activity.as_ref().is_some_and(|a| a.change.is_some()));
        }
    }
    // What a ManageSieve server answers: tokens or an error, never a panic.
    let mut tokens = Vec::new();
    let _ = tokenize(data, &mut tokens);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(folder) = decode_folder(text) {
            assert_eq!(decode_folder(&encode_folder(&folder)).as_deref(), Some(folder.as_str()));
        }
        assert_eq!(decode_folder(&encode_folder(text)).as_deref(), Some(text), "every name round-trips");
        // The arguments of an exported SETACL: a change whose rights are sorted and once
        // each, or an error.
        if let Ok(change) = mailhook::source::dovecot::acl::parse("SETACL", text) {
            assert!(change.rights.windows(2).all(|w| w[0] < w[1]));
            assert!(!change.identifier.is_empty() || !change.negative);
        }
    }
    let _ = parse_headers(data, 0);
});
