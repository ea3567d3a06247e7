//! Any bytes as a journaled message: the parser returns events or a reason, never panics.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use mailhook::source::journal::{Envelope, parse};

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
            for e in journaled.events {
                assert!(!e.mailbox.is_empty());
                assert_eq!(e.raw_message.as_deref(), Some(journaled.original.sha256.as_str()));
            }
        }
    }
);
