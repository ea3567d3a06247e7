//! Any bytes as an ingest request body (JSON and NDJSON): events or a refusal naming the
//! field, never a panic; what is accepted is normalized.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailhook::source::http::read_events;

fuzz_target!(|data: &[u8]| {
    let internal = vec!["example.com".to_string()];
    for ndjson in [false, true] {
        match read_events(data, ndjson, 100, &internal, jiff::Timestamp::UNIX_EPOCH) {
            Ok(events) => {
                assert!(!events.is_empty() && events.len() <= 100);
                for e in events {
                    assert!(!e.mailbox.is_empty());
                    assert_eq!(e.mailbox, e.mailbox.to_lowercase(), "addresses are normalized");
                }
            }
            Err(refusal) => {
                assert!(refusal.status == 400 || refusal.status == 413, "{refusal:?}");
                assert!(!refusal.message.is_empty());
            }
        }
    }
});
