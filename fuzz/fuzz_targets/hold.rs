//! A LegalHold spec, a mailbox and a time, all from the fuzzer's bytes, through what the
//! ingest path and the purges ask: compiling gives a hold or an error naming a field,
//! judging never panics, and a hold without a time range keeps exactly the mailboxes its
//! mailbox set contains, whatever they hold (non-ASCII, malformed, empty).
//!
//! Input: the spec as JSON, a NUL byte, the mailbox, a NUL byte, a time in RFC 3339.
//! Bytes that are not UTF-8 become U+FFFD, as `String::from_utf8_lossy` makes them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailhook::api::LegalHoldSpec;
use mailhook::route::{CompiledHold, MailboxSet};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let spec = parts.next().unwrap_or_default();
    let mailbox = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let at = String::from_utf8_lossy(parts.next().unwrap_or_default())
        .parse::<jiff::Timestamp>()
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let Ok(spec) = serde_json::from_slice::<LegalHoldSpec>(spec) else {
        return;
    };
    let hold = match CompiledHold::compile("h", &spec) {
        Ok(hold) => hold,
        Err(e) => {
            assert!(e.field.starts_with("spec."), "{e:?}");
            return;
        }
    };
    let held = hold.holds(&mailbox, at);
    if spec.from.is_none() && spec.until.is_none() {
        let set = MailboxSet::compile(&spec.mailboxes, &spec.domains).expect("compiled once already");
        assert_eq!(held, set.contains(&mailbox), "mailbox {mailbox:?}");
    }
});
