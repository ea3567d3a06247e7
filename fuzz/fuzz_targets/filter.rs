//! Any bytes as a MailboxFilter spec (JSON, as the API server would hand it over after its
//! own checks): compiling gives a filter or an error, and matching never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailhook::api::MailboxFilterSpec;
use mailhook::event::MailboxEvent;
use mailhook::route::CompiledFilter;

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<MailboxFilterSpec>(data) else {
        return;
    };
    let Ok(filter) = CompiledFilter::compile(&spec) else {
        return;
    };
    let event: MailboxEvent = serde_json::from_value(serde_json::json!({
        "id": "evt_1", "type": "message.received", "occurredAt": "2026-01-01T00:00:00Z",
        "receivedAt": "2026-01-01T00:00:00Z", "source": "http", "mailbox": "alice@example.com",
        "from": "x@partner.org", "to": ["alice@example.com"], "subject": "Quarterly numbers",
        "size": 12345, "direction": "inbound", "headers": {"x-spam": "no"},
        "attachments": [{"name": "q3.pdf", "contentType": "application/pdf", "size": 100}]
    }))
    .expect("a valid event");
    let _ = filter.matches(&event);
});
