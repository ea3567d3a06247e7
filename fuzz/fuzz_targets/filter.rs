//! A MailboxFilter spec and an event, both from the fuzzer's bytes, through the routing
//! table as ingest uses it: compiling gives a filter or an error, routing never panics,
//! and the table (its domain index) matches exactly when the filter alone does, whatever
//! the addresses, domains, subjects and headers hold (non-ASCII, malformed, empty).
//!
//! Input: the spec as JSON, a NUL byte, then the event's fields separated by newlines:
//! mailbox, from, to, cc, subject, header value, attachment name, attachment type.
//! Bytes that are not UTF-8 become U+FFFD, as `String::from_utf8_lossy` makes them.
#![no_main]

use std::sync::Arc;

mod common;

use libfuzzer_sys::fuzz_target;
use mailhook::api::MailboxFilterSpec;
use mailhook::event::{Attachment, MailboxEvent};
use mailhook::route::CompiledFilter;

fuzz_target!(|data: &[u8]| {
    let (spec, fields) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(spec) = serde_json::from_slice::<MailboxFilterSpec>(spec) else {
        return;
    };
    let Ok(filter) = CompiledFilter::compile(&spec) else {
        return;
    };
    let fields = String::from_utf8_lossy(fields);
    let mut f = fields.split('\n');
    let mut next = || f.next().unwrap_or_default().to_string();
    let mut event: MailboxEvent = serde_json::from_value(serde_json::json!({
        "id": "evt_1", "type": "message.received", "occurredAt": "2026-01-01T00:00:00Z",
        "receivedAt": "2026-01-01T00:00:00Z", "source": "http", "mailbox": "alice@example.com",
        "size": 12345, "direction": "inbound",
    }))
    .expect("a valid event");
    event.mailbox = next();
    event.from = Some(next());
    event.to = vec![next()];
    event.cc = vec![next()];
    event.subject = Some(next());
    event.headers.insert("x-spam".into(), next());
    event.attachments = vec![Attachment {
        name: Some(next()),
        content_type: Some(next()),
        size: Some(100),
        sha256: None,
    }];
    let compiled = Arc::new(filter);
    let alone = compiled.matches(&event);
    let table = common::one_route(compiled);
    let routed = table.route(&event);
    // The table's domain index may skip a filter only when it cannot match: routing agrees
    // with evaluating the filter alone, whatever the mailbox's domain holds.
    let in_table = routed.matched.iter().any(|(ns, name)| ns == "ns" && name == "f");
    assert_eq!(in_table, alone, "mailbox {:?}", event.mailbox);
    for derived in &routed.flagged {
        let _ = table.route(derived);
    }
});
