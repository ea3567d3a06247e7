//! The verification code that faces the network: raw message links (signature, expiry,
//! message, subscription, mailbox and event type), signing keys read from Secrets,
//! endpoint verification echoes and extra headers.
//! Never a panic, and no link is accepted that the signer did not make.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mailhook::archive::{LinkTo, RawLinks};
use mailhook::delivery::{client, signing::SigningKey, verification};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(6, '\n');
    let mut next = || parts.next().unwrap_or_default();
    let (expires, signature) = (next(), next());
    let to = LinkTo {
        sha256: next(),
        subscription: next(),
        mailbox: next(),
        event_type: next(),
    };
    let links = RawLinks::new([9; 32], "https://mailhook.example", Duration::from_secs(3600));
    let now = jiff::Timestamp::UNIX_EPOCH;
    if links.verify(&to, expires, signature, now).is_ok() {
        // Only possible for a link this signer made: check it is that link.
        let made = expires
            .parse::<i64>()
            .ok()
            .and_then(|e| jiff::Timestamp::from_second(e.saturating_sub(3600)).ok())
            .map(|t| links.link(&to, t).url);
        if let Some(url) = made {
            assert!(
                url.ends_with(&format!("signature={signature}")),
                "accepted a link it did not make"
            );
        }
    }
    let _ = SigningKey::parse(&text);
    let _ = verification::echoes(data, "challenge");
    let _ = client::check_header(to.sha256, expires);
});
