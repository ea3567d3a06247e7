//! Any bytes as a journaled message: the parser returns events or a reason, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailhook::source::journal::{Envelope, parse};

fuzz_target!(
    init: {
        // mail-parser 0.11 panics on some malformed multiparts; `parse` catches that and
        // refuses the message (tests/fixtures/journal/fuzz-mail-parser-panic.eml). Any other
        // panic is a finding: abort so libFuzzer records the input.
        std::panic::set_hook(Box::new(|info| {
            let upstream = info.location().is_some_and(|l| l.file().contains("mail-parser"));
            if !upstream {
                eprintln!("{info}");
                std::process::abort();
            }
        }));
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
