//! Any bytes as a journaled message: the parser returns events or a reason, never panics.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use mailhook::source::journal::{Envelope, MAX_ATTACHMENTS, MAX_LISTED, MAX_REPORT_RECIPIENTS, MAX_TEXT, parse};

fuzz_target!(
    init: {
        // mail-parser's known panics are caught by `parse`; any other is a finding.
        common::abort_on_our_panics();
    },
    |data: &[u8]| {
        let envelope = Envelope {
            mail_from: Some("journal@contoso.com".into()),
            rcpt_to: vec!["alice@contoso.com".into()],
        };
        let internal = vec!["contoso.com".to_string()];
        if let Ok(journaled) = parse(data, &envelope, &internal, jiff::Timestamp::UNIX_EPOCH) {
            // Bounded whatever the input: what one message expands to stays linear.
            assert!(journaled.len() <= MAX_REPORT_RECIPIENTS + 1);
            for e in journaled.events() {
                assert!(!e.mailbox.is_empty());
                assert_eq!(e.raw_message.as_deref(), Some(journaled.original.sha256.as_str()));
                assert!(e.subject.as_ref().is_none_or(|s| s.len() <= MAX_TEXT));
                assert!(e.message_id.as_ref().is_none_or(|s| s.len() <= MAX_TEXT));
                assert!(e.attachments.len() <= MAX_ATTACHMENTS);
                // A recipient's event shows a bounded view, and no one else's Bcc.
                if e.from.as_deref() != Some(e.mailbox.as_str()) && e.event_type == mailhook::api::EventType::MessageReceived {
                    assert!(e.to.len() <= MAX_LISTED && e.cc.len() <= MAX_LISTED);
                    assert!(e.bcc.iter().all(|b| *b == e.mailbox));
                }
            }
        }
    }
);
